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
// kernel (the container survived): address, endpoint record and its MAC
// and address claims (claims.go), and drops the others. The claims go and
// come back in the same transactions as the endpoint record.

// orphanRecord is an endpoint of a lost host, with the addresses released
// for it.
type orphanRecord struct {
	Overlay   string            `json:"overlay"`
	ID        string            `json:"id"`
	Endpoint  endpointRecord    `json:"endpoint"`
	Addresses []ipam.Allocation `json:"addresses,omitempty"`
	// Conflict, set by the returning host: its address was allocated again
	// while the host was lost, so the endpoint gave it up (its interface on
	// the overlay is down) and is never restored.
	Conflict      string `json:"conflict,omitempty"`
	ConflictSince string `json:"conflict_since,omitempty"` // RFC 3339, UTC
}

// collectLost orphans the endpoints of hosts whose live key is gone, if
// this host is the one to do it: the live host with the lowest address.
// Right after this host's view of hosts/ was (re)loaded it waits one
// liveness TTL, as hosts may still be re-registering.
func (p *peerSync) collectLost(ctx context.Context) error {
	if !p.hosts[p.host] {
		return nil
	}
	for h := range p.hosts {
		if addrLess(h, p.host) {
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
	if wait := p.liveTTL - time.Since(p.hostsLoaded); wait > 0 {
		time.AfterFunc(wait, p.kick)
		return nil
	}
	slices.SortFunc(lost, func(a, b string) int { return strings.Compare(a, b) })
	var errs []error
	for _, h := range lost {
		errs = append(errs, orphanHost(ctx, p.st, h, p.log.With("lost_host", h)))
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
		claims, err := claimDeletes(ctx, s, o.Overlay, id, rec)
		if err != nil {
			errs = append(errs, fmt.Errorf("lost host %s: orphan endpoint %.12s: %w", host, id, err))
			continue
		}
		ops = append(ops, claims...)
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
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	kvs, err := p.st.List(ctx, orphansOf(p.host))
	if err != nil {
		return fmt.Errorf("list orphaned endpoints: %w", err)
	}
	var errs []error
	kept := map[uint32]bool{}
	for _, kv := range kvs {
		vni, err := p.local.restoreOrphan(ctx, kv)
		if err != nil {
			errs = append(errs, err)
		}
		if vni != 0 {
			kept[vni] = true
		}
	}
	p.kept = kept
	return errors.Join(errs...)
}

// restoreOrphan restores one orphaned endpoint of this host, or drops its
// record, or leaves it in place; for one left in place whose interface is
// still there it returns its overlay's VNI, which must stay on this host.
func (d *Driver) restoreOrphan(ctx context.Context, kv store.KV) (uint32, error) {
	s := d.cfg.Store
	o, err := decodeKV[orphanRecord](kv)
	if err != nil {
		return 0, err
	}
	drop := func(why string) (uint32, error) {
		if err := s.Txn(ctx, store.Delete(kv.Key, kv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
			return 0, fmt.Errorf("drop orphaned endpoint %.12s: %w", o.ID, err)
		}
		d.log.Info("orphaned endpoint dropped: "+why, "endpoint", short(o.ID), "ip", o.Endpoint.IPv4)
		return 0, nil
	}
	n, err := d.network(ctx, o.Endpoint.Network)
	if err != nil {
		if _, gerr := s.Get(ctx, netmapKey(d.host, o.Endpoint.Network)); errors.Is(gerr, store.ErrNotFound) {
			return drop("its network is gone")
		}
		return 0, err
	}
	vni := n.Overlay.VNI
	has, err := d.cfg.Plane.HasEndpoint(vni, o.ID)
	if err != nil {
		return 0, fmt.Errorf("orphaned endpoint %.12s: %w", o.ID, err)
	}
	if !has {
		return drop("its interface is gone")
	}
	if o.Conflict != "" {
		// Given up before: it stays cut off until its container goes.
		d.forgetLocal(o.ID)
		if err := d.cfg.Plane.DisableEndpoint(vni, o.ID); err != nil {
			return vni, fmt.Errorf("orphaned endpoint %.12s: %w", o.ID, err)
		}
		return vni, nil
	}
	ops := []store.Op{store.Delete(kv.Key, kv.Version), store.Create(endpointKey(o.Overlay, o.ID), encode(o.Endpoint))}
	ops = append(ops, claimOps(o.Overlay, o.ID, o.Endpoint)...)
	for _, a := range o.Addresses {
		op, err := ipam.ClaimOp(a)
		if err != nil {
			return 0, fmt.Errorf("orphaned endpoint %.12s: %w", o.ID, err)
		}
		ops = append(ops, op)
	}
	err = s.Txn(ctx, ops...)
	if err == nil {
		// Known at once as a local endpoint: the reconciliation that
		// follows must not see its overlay unused (and delete it with the
		// endpoint's interface) before the watch brings the record back.
		d.mu.Lock()
		d.endpoints[o.ID] = &localEndpoint{ID: o.ID, Network: o.Endpoint.Network, Rec: o.Endpoint}
		d.mu.Unlock()
		d.log.Info("endpoint restored after this host was lost", "endpoint", short(o.ID), "ip", o.Endpoint.IPv4)
		// Our own write: the next plan must count the endpoint as this
		// host's before the watch brings it, or it removes the overlay
		// the endpoint's interface is in. (This runs on the peer sync's
		// goroutine, which owns the mirror.)
		d.peers.setEndpoint(endpointKey(o.Overlay, o.ID), &o.Endpoint)
		return 0, nil
	}
	if !errors.Is(err, store.ErrConflict) {
		return 0, fmt.Errorf("restore endpoint %.12s: %w", o.ID, err)
	}
	if _, gerr := s.Get(ctx, endpointKey(o.Overlay, o.ID)); gerr == nil {
		return drop("its endpoint record exists again")
	}
	for _, a := range o.Addresses {
		holder, herr := ipam.Holder(ctx, s, a)
		if herr != nil || holder == "" {
			continue
		}
		return d.giveUp(ctx, kv, o, vni, "address "+a.Address, holder)
	}
	for _, c := range claimsOf(o.Overlay, o.Endpoint) {
		ckv, err := s.Get(ctx, c.Key)
		if err != nil {
			continue
		}
		holder, err := decodeKV[claimRecord](ckv)
		if err != nil {
			continue
		}
		if holder.Endpoint == o.ID {
			// Left by an earlier version's host-loss handling: drop it
			// and restore on the next pass.
			if err := s.Txn(ctx, store.Delete(ckv.Key, ckv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
				return vni, fmt.Errorf("restore endpoint %.12s: %w", o.ID, err)
			}
			d.peers.restoreLater()
			return vni, nil
		}
		return d.giveUp(ctx, kv, o, vni, c.What, fmt.Sprintf("endpoint %.12s on host %s", holder.Endpoint, holder.Host))
	}
	return 0, nil // the orphan changed meanwhile: the next pass sees it
}

// giveUp cuts off an orphaned endpoint of this host whose address (or
// MAC), what, went to another container, holder, while this host was
// lost. Two live containers must never share an address: this one, the
// late one, gives it up, visibly: its interface goes down, its orphan
// record says why, and the log names both holders. It returns the
// overlay's VNI, which stays on this host until the container goes.
func (d *Driver) giveUp(ctx context.Context, kv store.KV, o orphanRecord, vni uint32, what, holder string) (uint32, error) {
	d.forgetLocal(o.ID)
	if err := d.cfg.Plane.DisableEndpoint(vni, o.ID); err != nil {
		return vni, fmt.Errorf("orphaned endpoint %.12s: take its interface down: %w", o.ID, err)
	}
	o.Conflict = fmt.Sprintf("%s was allocated again while this host was lost, to %s", what, holder)
	o.ConflictSince = time.Now().UTC().Format(time.RFC3339)
	if err := d.cfg.Store.Txn(ctx, store.Update(kv.Key, encode(o), kv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
		return vni, fmt.Errorf("orphaned endpoint %.12s: record the conflict: %w", o.ID, err)
	}
	d.log.Error("address conflict after this host was lost: the container's interface on the overlay is taken down; remove and re-create the container (docker rm -f, docker run) to give it a new address",
		"endpoint", short(o.ID), "network", short(o.Endpoint.Network), "overlay", o.Overlay, "taken", what,
		"held_before_by", fmt.Sprintf("endpoint %s on host %s (this host)", o.ID, d.host), "held_now_by", holder)
	return vni, nil
}

// OrphanedEndpoint is an endpoint of a host whose record was orphaned
// while the host was lost, and not restored (yet).
type OrphanedEndpoint struct {
	ID      string
	Overlay string
	VNI     uint32 // 0 when its network is unknown here
	IPv4    string
	// Conflict says why it was given up: its address went to another
	// container meanwhile (see restoreOrphan); empty while it waits.
	Conflict string
}

// orphaned lists this host's orphaned endpoints.
func (p *peerSync) orphaned(ctx context.Context) ([]OrphanedEndpoint, error) {
	kvs, err := p.st.List(ctx, orphansOf(p.host))
	if err != nil {
		return nil, fmt.Errorf("list orphaned endpoints: %w", err)
	}
	var out []OrphanedEndpoint
	for _, kv := range kvs {
		o, err := decodeKV[orphanRecord](kv)
		if err != nil {
			continue
		}
		oe := OrphanedEndpoint{ID: o.ID, Overlay: o.Overlay, IPv4: o.Endpoint.IPv4, Conflict: o.Conflict}
		if n, err := p.local.network(ctx, o.Endpoint.Network); err == nil {
			oe.VNI = n.Overlay.VNI
		}
		out = append(out, oe)
	}
	return out, nil
}

// forgetLocal drops an endpoint this process still knows from before its
// host was lost: the store has no record of it any more, so Docker's Leave
// and DeleteEndpoint for it then end it as forgetEndpoint does (removing
// its orphan record too).
func (d *Driver) forgetLocal(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.endpoints, id)
}
