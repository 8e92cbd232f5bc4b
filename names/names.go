// Package names makes the names of containers on an overlay resolvable
// from every host of the overlay (docs/names.md).
//
// Each host learns the names of its own containers (container name,
// network aliases, Compose service name) from its local dockerd, outside
// any plugin callback, and publishes them in the store next to the
// endpoint records. Every host watches them and answers DNS queries on a
// link-local address inside each overlay's namespace; containers reach it
// through a route Join gives them, and Docker's embedded DNS asks it once
// the daemon's "dns" setting names that address.
package names

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/store"
)

// DefaultAddr is the name server's address: link-local, so it never
// leaves a host, and the same on every host.
var DefaultAddr = netip.MustParseAddr("169.254.53.53")

// Config is what the name service needs.
type Config struct {
	Store store.Store
	Host  string     // this host's underlay address, as the driver records it
	Addr  netip.Addr // the name server's address (IPv4 link-local)
	// Docker is the local dockerd's API socket: unix:///var/run/docker.sock.
	Docker string
	// NetNS returns the path of an overlay's network namespace on this host.
	NetNS func(vni uint32) (string, error)
	// Cache is a file where the service keeps what it last knew, to answer
	// from after a restart while the store is down ("": none).
	Cache string
	Log   *slog.Logger
}

// Service is the name service of one host. It implements
// driver.NameService; wrap the data plane with Plane.
type Service struct {
	cfg   Config
	log   *slog.Logger
	kickc chan struct{}
	idx   atomic.Pointer[index]
	done  chan struct{}

	mu          sync.Mutex
	joins       map[string]joined         // endpoint id -> its Join on this host
	docker      map[string]dockerEndpoint // endpoint id -> what dockerd says about it
	endpoints   []driver.KnownEndpoint    // the store's endpoints, as the driver last saw them
	live        map[string]bool
	haveView    bool
	records     map[string]record // names/... key -> record, as the store watch last said
	haveRecords bool

	srvMu   sync.Mutex
	servers map[uint32]*server // the name server of each overlay on this host, by VNI
}

type joined struct {
	sandbox, overlay string
	route            int // prefix length of the route given; 0: none
}

// New checks cfg and returns a service; call Start to run it.
func New(cfg Config) (*Service, error) {
	if !cfg.Addr.Is4() || !cfg.Addr.IsLinkLocalUnicast() {
		return nil, fmt.Errorf("name server address %v: want an IPv4 link-local address (169.254.0.0/16), such as %v", cfg.Addr, DefaultAddr)
	}
	if cfg.Store == nil || cfg.NetNS == nil || cfg.Host == "" {
		return nil, errors.New("names: Store, Host and NetNS are required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Service{
		cfg:     cfg,
		log:     cfg.Log.With("component", "names"),
		kickc:   make(chan struct{}, 1),
		done:    make(chan struct{}),
		joins:   map[string]joined{},
		docker:  map[string]dockerEndpoint{},
		live:    map[string]bool{},
		records: map[string]record{},
		servers: map[uint32]*server{},
	}
	s.idx.Store(buildIndex(indexInput{}))
	return s, nil
}

// Start runs the service until ctx ends: the host's own answer on the
// name server's address, the store watch of names, the dockerd watch, and
// publishing this host's names.
func (s *Service) Start(ctx context.Context) {
	s.startHostServer()
	s.loadCache()
	var wg sync.WaitGroup
	wg.Go(func() { s.watchDocker(ctx) })
	wg.Go(func() { s.run(ctx) })
	go func() {
		wg.Wait()
		s.stopServers()
		close(s.done)
	}()
}

// Done is closed once the service stopped after Start's ctx ended.
func (s *Service) Done() <-chan struct{} { return s.done }

func (s *Service) kick() {
	select {
	case s.kickc <- struct{}{}:
	default:
	}
}

// Join records the endpoint's container and returns the route to the name
// server through the endpoint's interface (see pickRoute).
func (s *Service) Join(ov driver.Overlay, endpointID, sandboxKey string) []*network.StaticRoute {
	s.mu.Lock()
	j, ok := s.joins[endpointID]
	if !ok || j.sandbox != sandboxKey {
		var used []int
		for id, o := range s.joins {
			if id != endpointID && o.sandbox == sandboxKey {
				used = append(used, o.route)
			}
		}
		// After a plugin restart the records remember the routes given
		// before it.
		for key, r := range s.records {
			if _, id, _ := splitKey(key); id != endpointID && r.Host == s.cfg.Host && r.Sandbox == sandboxKey {
				used = append(used, r.Route)
			}
		}
		j = joined{sandbox: sandboxKey, overlay: ov.Name, route: pickRoute(used)}
		s.joins[endpointID] = j
	}
	s.mu.Unlock()
	s.kick()
	if j.route == 0 {
		s.log.Warn("container is on too many overlays of this plugin for one more route to the name server; it resolves through the others",
			"endpoint", short(endpointID), "overlay", ov.Name)
		return nil
	}
	return []*network.StaticRoute{staticRoute(s.cfg.Addr, j.route)}
}

// Leave forgets the endpoint's container.
func (s *Service) Leave(endpointID string) {
	s.mu.Lock()
	delete(s.joins, endpointID)
	s.mu.Unlock()
	s.kick()
}

// Observe takes the store's endpoints and live hosts.
func (s *Service) Observe(endpoints []driver.KnownEndpoint, liveHosts []string) {
	live := make(map[string]bool, len(liveHosts))
	for _, h := range liveHosts {
		live[h] = true
	}
	s.mu.Lock()
	s.endpoints, s.live, s.haveView = endpoints, live, true
	s.mu.Unlock()
	s.kick()
}

// debounce lets a burst of changes become one rebuild.
const debounce = 5 * time.Millisecond

// run keeps the index and this host's records in the store up to date.
func (s *Service) run(ctx context.Context) {
	evs, err := s.cfg.Store.Watch(ctx, Dir)
	if err != nil {
		s.log.Error("cannot watch names in the store; names of other hosts stay unknown", "err", err)
		return
	}
	defer func() {
		for range evs { // until the watch has stopped reading the store
		}
	}()
	var timer <-chan time.Time
	dirty := func() {
		if timer == nil {
			timer = time.After(debounce)
		}
	}
	retry := time.Duration(0)
	var lastSave time.Time
	savePending := false
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-evs:
			if !ok {
				return
			}
			s.applyRecord(ev)
			dirty()
		case <-s.kickc:
			dirty()
		case <-timer:
			timer = nil
			s.rebuild()
			if err := s.sync(ctx); err != nil {
				retry = min(max(2*retry, 250*time.Millisecond), 5*time.Second)
				s.log.Warn("publishing names failed; retrying", "in", retry, "err", err)
				time.AfterFunc(retry, s.kick)
			} else {
				retry = 0
			}
			// The cache file follows, at most once per cacheEvery.
			if wait := cacheEvery - time.Since(lastSave); wait <= 0 {
				if err := s.saveCache(); err != nil {
					s.log.Warn("cannot write the names cache", "err", err)
				}
				lastSave, savePending = time.Now(), false
			} else if !savePending {
				savePending = true
				time.AfterFunc(wait, s.kick)
			}
		}
	}
}

func (s *Service) applyRecord(ev store.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	put := func(kv store.KV) {
		if _, _, ok := splitKey(kv.Key); !ok {
			return
		}
		r, err := decodeRecord(kv)
		if err != nil {
			s.log.Warn("skipping name record", "err", err)
			return
		}
		s.records[kv.Key] = r
	}
	switch ev.Type {
	case store.EventReset:
		s.records = map[string]record{}
		for _, kv := range ev.Snapshot {
			put(kv)
		}
		s.haveRecords = true
	case store.EventPut:
		put(ev.KV)
	case store.EventDelete:
		delete(s.records, ev.KV.Key)
	}
}

// rebuild makes a new index from what is known now.
func (s *Service) rebuild() {
	s.mu.Lock()
	in := indexInput{host: s.cfg.Host, endpoints: s.endpoints, live: s.live, records: s.records, sandboxes: s.sandboxesLocked()}
	ix := buildIndex(in)
	s.mu.Unlock()
	s.idx.Store(ix)
}

// sandboxesLocked maps this host's endpoints to their containers'
// sandboxes: from Join, else from dockerd, else from the records.
func (s *Service) sandboxesLocked() map[string]string {
	out := map[string]string{}
	for key, r := range s.records {
		if _, id, _ := splitKey(key); r.Host == s.cfg.Host && r.Sandbox != "" {
			out[id] = r.Sandbox
		}
	}
	for id, d := range s.docker {
		if d.Sandbox != "" {
			out[id] = d.Sandbox
		}
	}
	for id, j := range s.joins {
		if j.sandbox != "" {
			out[id] = j.sandbox
		}
	}
	return out
}

// storeTimeout bounds one store call of the name service.
const storeTimeout = 5 * time.Second

// sync writes the records of this host's endpoints that dockerd has
// named, and deletes the records whose endpoint is gone: this host's own,
// and, on the live host with the lowest address, those of lost hosts.
func (s *Service) sync(ctx context.Context) error {
	s.mu.Lock()
	if !s.haveView || !s.haveRecords {
		s.mu.Unlock()
		return nil
	}
	puts, dels := s.planLocked()
	s.mu.Unlock()
	var errs []error
	for key, r := range puts {
		cctx, cancel := context.WithTimeout(ctx, storeTimeout)
		_, err := s.cfg.Store.Put(cctx, key, encodeRecord(r))
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("write %s: %w", key, err))
			continue
		}
		s.log.Debug("names published", "key", key, "names", r.Names)
	}
	for _, key := range dels {
		cctx, cancel := context.WithTimeout(ctx, storeTimeout)
		err := s.cfg.Store.Delete(cctx, key)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", key, err))
			continue
		}
		s.log.Debug("names withdrawn", "key", key)
	}
	return errors.Join(errs...)
}

// planLocked says which records to write and which to delete.
func (s *Service) planLocked() (map[string]record, []string) {
	exists := map[string]bool{}
	puts := map[string]record{}
	for _, ep := range s.endpoints {
		key := recordKey(ep.Overlay, ep.ID)
		exists[key] = true
		if ep.Host != s.cfg.Host {
			continue
		}
		d, ok := s.docker[ep.ID]
		if !ok {
			continue // not named by dockerd (yet)
		}
		cur, had := s.records[key]
		want := record{Host: s.cfg.Host, Container: d.Container, Name: d.Name, Network: d.Network, Names: d.Names, Sandbox: d.Sandbox}
		if j, ok := s.joins[ep.ID]; ok {
			want.Sandbox, want.Route = j.sandbox, j.route
		} else if had && cur.Sandbox == want.Sandbox {
			want.Route = cur.Route
		}
		if !had || !cur.equal(want) {
			puts[key] = want
		}
	}
	collector := s.live[s.cfg.Host]
	for h := range s.live {
		if addrLess(h, s.cfg.Host) {
			collector = false
		}
	}
	var dels []string
	for key, r := range s.records {
		if exists[key] {
			continue
		}
		if r.Host == s.cfg.Host || (collector && !s.live[r.Host]) {
			dels = append(dels, key)
		}
	}
	slices.Sort(dels)
	return puts, dels
}

// addrLess orders host addresses numerically (the driver's host-loss
// collector is the live host with the lowest address too).
func addrLess(a, b string) bool {
	x, errx := netip.ParseAddr(a)
	y, erry := netip.ParseAddr(b)
	if errx != nil || erry != nil {
		return a < b
	}
	return x.Less(y)
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}
