package driver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// Stale hosts. A lost host's endpoints are orphaned at once (hostloss.go),
// but the rest of what it holds waits for it to come back: its Docker
// networks (netmap/<host>/...) and with them its membership of overlays
// (which keeps their VNIs), its orphaned endpoints, its pool and gateway
// references and its last-seen record. A host gone for longer than
// Config.StaleAfter is not coming back: the live host that collects lost
// hosts purges all of it, as if the host had removed its networks itself.
// A host that does come back after that finds none of its networks: its
// user removes and creates them again (docs/operations-correctness.md).

// DefaultStaleAfter is how long a host may be gone before its records are
// purged.
const DefaultStaleAfter = 24 * time.Hour

// staleAfter is Config.StaleAfter, or its default.
func (d *Driver) staleAfter() time.Duration {
	if d.cfg.StaleAfter > 0 {
		return d.cfg.StaleAfter
	}
	return DefaultStaleAfter
}

// seenEvery is how often a registered host writes its last-seen time: every
// 30 s, more often when the grace period is short (tests), so that a host's
// last sign of life is known to a tenth of the grace period.
func seenEvery(staleAfter time.Duration) time.Duration {
	return min(seenInterval, max(staleAfter/10, time.Second))
}

// purgeEvery is how often the collecting host looks for stale hosts.
func purgeEvery(staleAfter time.Duration) time.Duration {
	return min(max(staleAfter/4, time.Second), 5*time.Minute)
}

// collector says whether this host is the one that handles lost hosts:
// the live host with the lowest address.
func (p *peerSync) collector() bool {
	if !p.hosts[p.host] {
		return false
	}
	for h := range p.hosts {
		if addrLess(h, p.host) {
			return false
		}
	}
	return true
}

// purgeStale purges the hosts gone for longer than the grace period, if
// this host is the collector.
func (p *peerSync) purgeStale(ctx context.Context) error {
	if !p.collector() {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	stale, err := staleHosts(ctx, p.st, p.staleAfter, time.Now())
	var errs []error
	for _, h := range stale {
		if err := purgeHost(ctx, p.st, h, p.log, p.staleAfter); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(append(errs, err)...)
}

// StaleHost is a host the store still has records of, without a live
// plugin.
type StaleHost struct {
	Address string
	// GoneSince is its last sign of life: its last heartbeat, or when a
	// collector first found it gone without one.
	GoneSince time.Time
}

// staleHosts returns the hosts gone for longer than after, in address
// order. A host gone without a last-seen record gets one now, so that its
// grace period starts.
func staleHosts(ctx context.Context, s store.Store, after time.Duration, now time.Time) ([]string, error) {
	gone, err := goneHosts(ctx, s)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, g := range gone {
		if g.GoneSince.IsZero() {
			rec := seenRecord{Addr: g.Address, Seen: now.UTC().Format(time.RFC3339)}
			if err := s.Txn(ctx, store.Create(seenKey(g.Address), encode(rec))); err != nil && !errors.Is(err, store.ErrConflict) {
				return out, fmt.Errorf("record when host %s was found gone: %w", g.Address, err)
			}
			continue
		}
		if now.Sub(g.GoneSince) > after {
			out = append(out, g.Address)
		}
	}
	return out, nil
}

// goneHosts lists the hosts that records name (networks, endpoints,
// orphaned endpoints, overlay membership, last-seen records) but that have
// no live plugin, with their last sign of life (zero when unknown).
func goneHosts(ctx context.Context, s store.Store) ([]StaleHost, error) {
	lists := map[string][]store.KV{}
	for _, dir := range []string{hostsDir, seenDir, netmapDir, orphansDir, overlaysDir, endpointsDir} {
		kvs, err := s.List(ctx, dir)
		if err != nil {
			return nil, fmt.Errorf("read %s from the store: %w", dir, err)
		}
		lists[dir] = kvs
	}
	live := map[string]bool{}
	for _, kv := range lists[hostsDir] {
		live[hostOfKey(hostsDir, kv.Key)] = true
	}
	named := map[string]bool{}
	for _, dir := range []string{netmapDir, orphansDir, seenDir} {
		for _, kv := range lists[dir] {
			h, _, _ := strings.Cut(strings.TrimPrefix(kv.Key, dir+"/"), "/")
			named[h] = true
		}
	}
	for _, kv := range lists[overlaysDir] {
		if rec, err := decodeKV[overlayRecord](kv); err == nil {
			for _, h := range rec.Hosts {
				named[h] = true
			}
		}
	}
	for _, kv := range lists[endpointsDir] {
		if rec, err := decodeKV[endpointRecord](kv); err == nil && rec.Host != "" {
			named[rec.Host] = true
		}
	}
	seen := map[string]time.Time{}
	for _, kv := range lists[seenDir] {
		if rec, err := decodeKV[seenRecord](kv); err == nil {
			seen[hostOfKey(seenDir, kv.Key)], _ = time.Parse(time.RFC3339, rec.Seen)
		}
	}
	var out []StaleHost
	for h := range named {
		if !live[h] && store.ValidKey(hostKey(h)) == nil {
			out = append(out, StaleHost{Address: h, GoneSince: seen[h]})
		}
	}
	slices.SortFunc(out, func(a, b StaleHost) int {
		if addrLess(a.Address, b.Address) {
			return -1
		}
		if addrLess(b.Address, a.Address) {
			return 1
		}
		return 0
	})
	return out, nil
}

// purgeHost removes every record of a host gone for good and releases what
// it held: its endpoints (orphaned first, their addresses released), its
// Docker networks and its membership of overlays (an overlay no host uses
// any more goes, with its VNI), its pool and gateway references, and its
// last-seen record. It does nothing while the host is live, and every
// write is conditional, so a host that comes back meanwhile keeps what it
// wrote since.
func purgeHost(ctx context.Context, s store.Store, host string, log *slog.Logger, grace time.Duration) error {
	log = log.With("stale_host", host)
	back := func() bool {
		_, err := s.Get(ctx, hostKey(host))
		return err == nil
	}
	if back() {
		return nil
	}
	seenKV, seenErr := s.Get(ctx, seenKey(host))
	if err := orphanHost(ctx, s, host, log); err != nil {
		return err
	}
	var errs []error
	del := func(kv store.KV) {
		if err := s.Txn(ctx, store.Delete(kv.Key, kv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
			errs = append(errs, fmt.Errorf("purge host %s: %w", host, err))
		}
	}
	orphans, err := s.List(ctx, orphansOf(host))
	if err != nil {
		return fmt.Errorf("purge host %s: %w", host, err)
	}
	for _, kv := range orphans {
		del(kv)
	}
	nets, err := s.List(ctx, netmapOf(host))
	if err != nil {
		return fmt.Errorf("purge host %s: %w", host, err)
	}
	for _, kv := range nets {
		if back() {
			return nil
		}
		del(kv)
	}
	overlays, err := s.List(ctx, overlaysDir)
	if err != nil {
		return fmt.Errorf("purge host %s: %w", host, err)
	}
	var left []string
	for _, kv := range overlays {
		rec, err := decodeKV[overlayRecord](kv)
		if err != nil || !slices.Contains(rec.Hosts, host) {
			continue
		}
		if back() {
			return nil
		}
		if err := leaveOverlay(ctx, s, rec.Name, host); err != nil {
			errs = append(errs, fmt.Errorf("purge host %s: leave overlay %s: %w", host, rec.Name, err))
			continue
		}
		left = append(left, rec.Name)
	}
	groups, err := s.List(ctx, mcastDir)
	if err != nil {
		return fmt.Errorf("purge host %s: %w", host, err)
	}
	for _, kv := range groups {
		if _, h, ok := splitMcastKey(kv.Key); ok && h == host {
			del(kv)
		}
	}
	released, err := ipam.PurgeHost(ctx, s, host, log)
	if err != nil {
		errs = append(errs, err)
	}
	if seenErr == nil {
		del(seenKV)
	}
	log.Info("stale host purged: gone longer than the grace period; its networks, overlays, orphaned endpoints, multicast groups and addresses released",
		"grace", grace.String(), "networks", len(nets), "orphaned_endpoints", len(orphans), "overlays_left", left, "ipam_released", released)
	return errors.Join(errs...)
}
