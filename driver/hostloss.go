package driver

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// Host loss. When a host's live key (hosts/<host>) is gone, the live host
// with the lowest address moves each endpoint record of the lost host to
// orphans/<host>/<ep id> and releases the endpoint's addresses in IPAM, in
// one transaction per endpoint. When the lost host's plugin registers
// again it restores the orphans whose interface still exists in its
// kernel (the container survived): address, endpoint record, and drops the
// others.

const orphansDir = "orphans"

func orphanKey(host, id string) string { return orphansDir + "/" + host + "/" + id }

// orphanRecord is an endpoint of a lost host, with the addresses released
// for it.
type orphanRecord struct {
	Overlay   string            `json:"overlay"`
	ID        string            `json:"id"`
	Endpoint  endpointRecord    `json:"endpoint"`
	Addresses []ipam.Allocation `json:"addresses,omitempty"`
}

// collectLost orphans the endpoints of hosts whose live key is gone, if
// this host is the one to do it: the live host with the lowest address.
// Right after this host's view of hosts/ was (re)loaded it waits one
// liveness TTL, as hosts may still be re-registering.
func (p *peerSync) collectLost(ctx context.Context) error {
	d := p.d
	if !p.hosts[d.host] {
		return nil
	}
	for h := range p.hosts {
		if addrLess(h, d.host) {
			return nil
		}
	}
	var lost []string
	for _, rec := range p.endpoints {
		if rec.Host != "" && !p.hosts[rec.Host] && !slices.Contains(lost, rec.Host) {
			lost = append(lost, rec.Host)
		}
	}
	if len(lost) == 0 {
		return nil
	}
	if wait := d.cfg.LiveTTL - time.Since(p.hostsLoaded); wait > 0 {
		time.AfterFunc(wait, p.kick)
		return nil
	}
	slices.SortFunc(lost, func(a, b string) int { return strings.Compare(a, b) })
	var errs []error
	for _, h := range lost {
		errs = append(errs, orphanHost(ctx, d.cfg.Store, h, d.log.With("lost_host", h)))
	}
	return errors.Join(errs...)
}

// orphanHost moves the endpoint records of host to orphan records and
// releases its endpoint addresses. It is idempotent, and safe when several
// hosts do it at once (every write is conditional).
func orphanHost(ctx context.Context, s store.Store, host string, log interface {
	Info(string, ...any)
	Debug(string, ...any)
}) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := s.Get(ctx, hostKey(host)); err == nil {
		return nil // back already
	} else if !errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("lost host %s: %w", host, err)
	}
	kvs, err := s.List(ctx, endpointsDir)
	if err != nil {
		return fmt.Errorf("lost host %s: %w", host, err)
	}
	held, err := ipam.HostAddresses(ctx, s, host)
	if err != nil {
		return fmt.Errorf("lost host %s: %w", host, err)
	}
	byAddr := map[string]ipam.Held{}
	for _, h := range held {
		byAddr[h.Address] = h
	}
	var errs []error
	for _, kv := range kvs {
		rec, err := decodeKV[endpointRecord](kv)
		if err != nil || rec.Host != host {
			continue
		}
		id := kv.Key[strings.LastIndex(kv.Key, "/")+1:]
		o := orphanRecord{Overlay: overlayOfKey(kv.Key), ID: id, Endpoint: rec}
		ops := []store.Op{store.Delete(kv.Key, kv.Version)}
		for _, s := range []string{rec.IPv4, rec.IPv6} {
			pfx, err := netip.ParsePrefix(s)
			if err != nil {
				continue
			}
			if h, ok := byAddr[pfx.Addr().String()]; ok {
				ops = append(ops, store.Delete(h.Key, h.Version))
				o.Addresses = append(o.Addresses, h.Allocation)
				delete(byAddr, h.Address)
			}
		}
		ops = append(ops, store.Put(orphanKey(host, id), encode(o)))
		err = s.Txn(ctx, ops...)
		if errors.Is(err, store.ErrConflict) {
			log.Debug("endpoint of lost host changed meanwhile; skipped", "endpoint", short(id))
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("lost host %s: orphan endpoint %.12s: %w", host, id, err))
			continue
		}
		log.Info("host lost: endpoint orphaned, addresses released", "endpoint", short(id), "overlay", o.Overlay, "ip", rec.IPv4)
	}
	for _, h := range byAddr {
		err := s.Txn(ctx, store.Delete(h.Key, h.Version))
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("lost host %s: release %s: %w", host, h.Address, err))
			continue
		}
		log.Info("host lost: address released", "address", h.Address, "pool", h.Pool)
	}
	return errors.Join(errs...)
}

// restoreOrphans takes back this host's orphaned endpoints whose
// interface survived in the kernel, and drops the others.
func (p *peerSync) restoreOrphans(ctx context.Context) error {
	d := p.d
	s := d.cfg.Store
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	kvs, err := s.List(ctx, orphansDir+"/"+d.host)
	if err != nil {
		return fmt.Errorf("list orphaned endpoints: %w", err)
	}
	var errs []error
	for _, kv := range kvs {
		if err := d.restoreOrphan(ctx, kv); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (d *Driver) restoreOrphan(ctx context.Context, kv store.KV) error {
	s := d.cfg.Store
	o, err := decodeKV[orphanRecord](kv)
	if err != nil {
		return err
	}
	drop := func(why string) error {
		if err := s.Txn(ctx, store.Delete(kv.Key, kv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
			return fmt.Errorf("drop orphaned endpoint %.12s: %w", o.ID, err)
		}
		d.log.Info("orphaned endpoint dropped: "+why, "endpoint", short(o.ID), "ip", o.Endpoint.IPv4)
		return nil
	}
	n, err := d.network(ctx, o.Endpoint.Network)
	if err != nil {
		if _, gerr := s.Get(ctx, netmapKey(d.host, o.Endpoint.Network)); errors.Is(gerr, store.ErrNotFound) {
			return drop("its network is gone")
		}
		return err
	}
	has, err := d.cfg.Plane.HasEndpoint(n.Overlay.VNI, o.ID)
	if err != nil {
		return fmt.Errorf("orphaned endpoint %.12s: %w", o.ID, err)
	}
	if !has {
		return drop("its interface is gone")
	}
	ops := []store.Op{store.Delete(kv.Key, kv.Version), store.Create(endpointKey(o.Overlay, o.ID), encode(o.Endpoint))}
	for _, a := range o.Addresses {
		op, err := ipam.ClaimOp(a)
		if err != nil {
			return fmt.Errorf("orphaned endpoint %.12s: %w", o.ID, err)
		}
		ops = append(ops, op)
	}
	err = s.Txn(ctx, ops...)
	if err == nil {
		d.log.Info("endpoint restored after this host was lost", "endpoint", short(o.ID), "ip", o.Endpoint.IPv4)
		// Our own write: the next plan must count the endpoint as this
		// host's before the watch brings it, or it removes the overlay
		// the endpoint's interface is in. (This runs on the peer sync's
		// goroutine, which owns the mirror.)
		d.peers.endpoints[endpointKey(o.Overlay, o.ID)] = o.Endpoint
		return nil
	}
	if !errors.Is(err, store.ErrConflict) {
		return fmt.Errorf("restore endpoint %.12s: %w", o.ID, err)
	}
	if _, gerr := s.Get(ctx, endpointKey(o.Overlay, o.ID)); gerr == nil {
		return drop("its endpoint record exists again")
	}
	for _, a := range o.Addresses {
		if holder, herr := ipam.Holder(ctx, s, a); herr == nil && holder != "" {
			d.log.Error("cannot restore endpoint after this host was lost: its address was taken meanwhile; remove and re-create the container",
				"endpoint", short(o.ID), "address", a.Address, "now_held_by", holder)
			return nil // left in place: an operator's call
		}
	}
	return nil // the orphan changed meanwhile: the next pass sees it
}
