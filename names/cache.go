package names

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
)

// The cache file keeps what this host last knew (the store's endpoints,
// live hosts and name records, and the overlays it served) so that a
// plugin that restarts while the store is down answers names at once, as
// before: what is known stays known. The store's own data replaces it as
// soon as the store answers.

type cacheFile struct {
	Endpoints []driver.KnownEndpoint `json:"endpoints"`
	Live      []string               `json:"live"`
	Records   map[string]record      `json:"records"`
	Overlays  []driver.Overlay       `json:"overlays"`
}

// cacheEvery bounds how often the cache file is written.
const cacheEvery = time.Second

// saveCache writes the cache file (run calls it at most once per
// cacheEvery).
func (s *Service) saveCache() error {
	if s.cfg.Cache == "" {
		return nil
	}
	var c cacheFile
	s.srvMu.Lock()
	for vni, sv := range s.servers {
		if vni != 0 {
			c.Overlays = append(c.Overlays, sv.ov)
		}
	}
	s.srvMu.Unlock()
	slices.SortFunc(c.Overlays, func(a, b driver.Overlay) int { return cmp.Compare(a.VNI, b.VNI) })
	s.mu.Lock()
	if !s.haveView || !s.haveRecords {
		s.mu.Unlock()
		return nil // nothing from the store yet: keep the old file
	}
	c.Endpoints, c.Records = s.endpoints, s.records
	for h := range s.live {
		c.Live = append(c.Live, h)
	}
	b, err := json.Marshal(c)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(s.cfg.Cache), 0o700); err != nil {
		return fmt.Errorf("names cache: %w", err)
	}
	tmp := s.cfg.Cache + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("names cache: %w", err)
	}
	if err := os.Rename(tmp, s.cfg.Cache); err != nil {
		return fmt.Errorf("names cache: %w", err)
	}
	return nil
}

// loadCache serves what the cache file holds until the store answers:
// the index, and the name servers of the overlays whose namespaces still
// exist.
func (s *Service) loadCache() {
	if s.cfg.Cache == "" {
		return
	}
	b, err := os.ReadFile(s.cfg.Cache)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	var c cacheFile
	if err == nil {
		err = json.Unmarshal(b, &c)
	}
	if err != nil {
		s.log.Warn("ignoring the names cache", "file", s.cfg.Cache, "err", err)
		return
	}
	s.mu.Lock()
	s.endpoints, s.records = c.Endpoints, c.Records
	if s.records == nil {
		s.records = map[string]record{}
	}
	s.live = map[string]bool{}
	for _, h := range c.Live {
		s.live[h] = true
	}
	s.mu.Unlock()
	s.rebuild()
	served := 0
	for _, ov := range c.Overlays {
		if _, err := s.cfg.NetNS(ov.VNI); err != nil {
			continue // gone meanwhile
		}
		s.serveOverlay(ov)
		served++
	}
	s.log.Info("serving names from the cache until the store answers", "file", s.cfg.Cache, "records", len(c.Records), "overlays", served)
}
