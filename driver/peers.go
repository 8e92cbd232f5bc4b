package driver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// peerSync keeps this host's kernel state following the store: for every
// overlay with a local endpoint, a bridge and tunnel, and one static
// forwarding and neighbour entry per endpoint on another live host. It
// registers this host's live key and watches endpoints/ and hosts/.
type peerSync struct {
	d     *Driver
	kickc chan struct{}

	// Mirrors of the store, owned by run's goroutine.
	endpoints map[string]endpointRecord // by store key
	hosts     map[string]bool
	haveEPs   bool
	haveHosts bool

	// Host loss (hostloss.go): when hosts/ was last loaded whole, and
	// whether this host's orphaned endpoints should be looked at.
	hostsLoaded time.Time
	restoreDue  bool

	// claimsDone: the claims of this host's endpoints recorded by an
	// earlier version were made (claims.go).
	claimsDone bool
	// skipped are the records the last reconciliation skipped, by key,
	// with why: each is logged when it starts and stops being skipped.
	skipped map[string]RecordProblem
	// kept are the VNIs of this host's orphaned endpoints whose interface
	// is still there (hostloss.go): their overlays stay.
	kept map[uint32]bool
}

// debounce lets a burst of store events become one reconciliation.
const debounce = 20 * time.Millisecond

func newPeerSync(d *Driver) *peerSync {
	return &peerSync{d: d, kickc: make(chan struct{}, 1), endpoints: map[string]endpointRecord{}, hosts: map[string]bool{},
		skipped: map[string]RecordProblem{}}
}

// restoreLater asks for another look at this host's orphaned endpoints
// (from run's goroutine only).
func (p *peerSync) restoreLater() {
	p.restoreDue = true
	time.AfterFunc(100*time.Millisecond, p.kick)
}

// kick asks for a reconciliation soon.
func (p *peerSync) kick() {
	select {
	case p.kickc <- struct{}{}:
	default:
	}
}

func (p *peerSync) run(ctx context.Context) {
	log := p.d.log
	registered := make(chan struct{})
	go func() { defer close(registered); p.register(ctx) }()
	defer func() { <-registered }()
	eps, err := p.d.cfg.Store.Watch(ctx, endpointsDir)
	if err != nil {
		log.Error("cannot watch endpoints", "err", err)
		return
	}
	// Stop only once the watches have: they close their channels when
	// ctx ends, and until then may still be reading the store.
	defer func() {
		for range eps {
		}
	}()
	hosts, err := p.d.cfg.Store.Watch(ctx, hostsDir)
	if err != nil {
		log.Error("cannot watch hosts", "err", err)
		return
	}
	defer func() {
		for range hosts {
		}
	}()
	purge := time.NewTicker(p.d.purgeEvery())
	defer purge.Stop()
	var timer <-chan time.Time
	dirty := func() {
		if timer == nil {
			timer = time.After(debounce)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-eps:
			if !ok {
				return
			}
			p.applyEndpoint(ev)
			dirty()
		case ev, ok := <-hosts:
			if !ok {
				return
			}
			p.applyHost(ev)
			dirty()
		case <-p.kickc:
			dirty()
		case <-purge.C:
			if p.haveEPs && p.haveHosts && p.d.id.ours() {
				if err := p.purgeStale(ctx); err != nil {
					log.Warn("purging the records of hosts gone longer than the grace period failed; retrying later", "err", err)
				}
			}
		case <-timer:
			timer = nil
			// Only once the live key is this machine's: until then the
			// records under this host's address may be another machine's.
			if p.haveEPs && p.haveHosts && p.d.id.ours() {
				if p.restoreDue && p.hosts[p.d.host] {
					p.restoreDue = false
					if err := p.restoreOrphans(ctx); err != nil {
						log.Warn("restoring orphaned endpoints failed; retrying", "err", err)
						p.restoreDue = true
						time.AfterFunc(time.Second, p.kick)
					}
				}
				if !p.claimsDone && p.hosts[p.d.host] {
					if err := p.backfillClaims(ctx); err != nil {
						log.Warn("claiming the MACs and addresses of endpoints recorded by an earlier version failed; retrying", "err", err)
						time.AfterFunc(time.Second, p.kick)
					} else {
						p.claimsDone = true
					}
				}
				if err := p.collectLost(ctx); err != nil {
					log.Warn("releasing a lost host's endpoints failed; retrying", "err", err)
					time.AfterFunc(time.Second, p.kick)
				}
				p.observeNames()
				changes, err := p.reconcile(ctx)
				if m := p.d.cfg.Metrics; m != nil {
					m.Reconciled(changes, err)
					m.Known(p.known())
				}
				if err != nil {
					log.Warn("reconcile failed; retrying", "err", err)
					time.AfterFunc(time.Second, p.kick)
				}
			}
		}
	}
}

// register keeps this host's live key, retrying while the store is away,
// and releases it when ctx ends (or, with Config.KeepLiveOnStop and
// endpoints still here, leaves it to lapse).
func (p *peerSync) register(ctx context.Context) {
	rec := hostRecord{Addr: p.d.host, ID: p.d.cfg.MachineID, Name: hostname(), Started: time.Now().UTC().Format(time.RFC3339), Key: p.d.cfg.PublicKey}
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		// The key lives until Release, not until ctx ends: a store deletes
		// a registration whose context ends.
		reg, err := p.d.cfg.Store.RegisterIf(context.WithoutCancel(ctx), hostKey(p.d.host), encode(rec), p.d.cfg.LiveTTL, mayTakeOver(rec))
		var conflict *IdentityConflict
		if errors.As(err, &conflict) {
			p.d.id.refuse(fmt.Errorf("the plugin refuses to work: %w", conflict))
			p.d.log.Error("this plugin refuses to work: another machine holds this host's advertise address", "err", conflict)
			return
		}
		if err == nil {
			p.d.id.setRegistered()
			p.kick()
			p.d.log.Info("host registered", "host", p.d.host, "machine_id", rec.ID, "ttl", p.d.cfg.LiveTTL.String())
			p.heartbeat(ctx, rec)
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if p.d.cfg.KeepLiveOnStop {
				if n, err := p.d.endpointsHere(rctx); n > 0 || err != nil {
					p.d.keptLive.Store(true)
					p.d.log.Info("stopping with endpoints on this host: its live key stays until it lapses, so a plugin back within the TTL loses nothing",
						"endpoints", n, "ttl", p.d.cfg.LiveTTL.String(), "err", err)
					p.lastSeen(rctx, rec)
					return
				}
			}
			reg.Release(rctx)
			p.lastSeen(rctx, rec)
			return
		}
		p.d.log.Warn("cannot register host yet", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// endpointsHere counts this host's endpoints: those the store records
// for it and those this process knows of.
func (d *Driver) endpointsHere(ctx context.Context) (int, error) {
	ids := map[string]bool{}
	d.mu.Lock()
	for id := range d.endpoints {
		ids[id] = true
	}
	d.mu.Unlock()
	kvs, err := d.cfg.Store.List(ctx, endpointsDir)
	for _, kv := range kvs {
		if rec, err := decodeKV[endpointRecord](kv); err == nil && rec.Host == d.host {
			ids[kv.Key[strings.LastIndex(kv.Key, "/")+1:]] = true
		}
	}
	return len(ids), err
}

func (p *peerSync) applyEndpoint(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.endpoints = map[string]endpointRecord{}
		for _, kv := range ev.Snapshot {
			p.putEndpoint(kv)
		}
		p.haveEPs = true
		p.restoreDue = true
	case store.EventPut:
		p.putEndpoint(ev.KV)
	case store.EventDelete:
		if p.endpoints[ev.KV.Key].Host == p.d.host {
			p.restoreDue = true // perhaps orphaned by another host
		}
		delete(p.endpoints, ev.KV.Key)
	}
}

func (p *peerSync) putEndpoint(kv store.KV) {
	rec, err := decodeKV[endpointRecord](kv)
	if err != nil {
		p.d.log.Warn("skipping endpoint record", "err", err)
		return
	}
	p.endpoints[kv.Key] = rec
}

func (p *peerSync) applyHost(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.hosts = map[string]bool{}
		for _, kv := range ev.Snapshot {
			p.hosts[strings.TrimPrefix(kv.Key, hostsDir+"/")] = true
		}
		p.haveHosts = true
		p.hostsLoaded = time.Now()
		p.restoreDue = true
	case store.EventPut:
		h := strings.TrimPrefix(ev.KV.Key, hostsDir+"/")
		p.hosts[h] = true
		if h == p.d.host {
			p.restoreDue = true // registered (again)
			p.checkOwnKey(ev.KV.Value)
		}
	case store.EventDelete:
		delete(p.hosts, strings.TrimPrefix(ev.KV.Key, hostsDir+"/"))
	}
}

// plannedOverlay is what one overlay should be on this host.
type plannedOverlay struct {
	net       *localNetwork    // one of this host's Docker networks on it
	networks  []string         // every Docker network of this host on it
	endpoints []*localEndpoint // its endpoints on this host
	peers     []Peer           // its endpoints on other live hosts, by MAC
	skipped   []RecordProblem  // its records of live hosts skipped (conflicts.go)
}

// plan computes from the mirrors what this host's kernel should hold:
// every overlay with a local endpoint, as the store says or as this
// process knows (the watch may lag behind our own writes), with the
// endpoints of the other live hosts as its peers. Overlays whose network
// cannot be read are left out and named in the error.
func (p *peerSync) plan(ctx context.Context) (map[string]*plannedOverlay, error) {
	d := p.d
	planned := map[string]*plannedOverlay{}
	var errs []error
	add := func(netID string) *plannedOverlay {
		n, err := d.network(ctx, netID)
		if err != nil {
			if _, gerr := d.cfg.Store.Get(ctx, netmapKey(d.host, netID)); errors.Is(gerr, store.ErrNotFound) {
				// A stale endpoint record of a network this host no longer
				// has: nothing to build for it, and no reason to hold back.
				d.log.Debug("endpoint record names a network this host does not have", "network", short(netID))
				return nil
			}
			errs = append(errs, err)
			return nil
		}
		po := planned[n.Overlay.Name]
		if po == nil {
			po = &plannedOverlay{net: n}
			planned[n.Overlay.Name] = po
		}
		if !slices.Contains(po.networks, netID) {
			po.networks = append(po.networks, netID)
		}
		return po
	}
	seen := map[string]bool{}
	for key, rec := range p.endpoints {
		if rec.Host != d.host {
			continue
		}
		if po := add(rec.Network); po != nil {
			id := key[strings.LastIndex(key, "/")+1:]
			po.endpoints = append(po.endpoints, &localEndpoint{ID: id, Network: rec.Network, Rec: rec})
			seen[id] = true
		}
	}
	d.mu.Lock()
	var local []*localEndpoint
	for _, ep := range d.endpoints {
		local = append(local, ep)
	}
	d.mu.Unlock()
	for _, ep := range local {
		if po := add(ep.Network); po != nil && !seen[ep.ID] {
			po.endpoints = append(po.endpoints, ep)
		}
	}

	records := map[string][]keyedRecord{}
	for key, rec := range p.endpoints {
		name := overlayOfKey(key)
		if rec.Host == d.host || !p.hosts[rec.Host] || planned[name] == nil {
			continue
		}
		records[name] = append(records[name], keyedRecord{key, rec})
	}
	for name, po := range planned {
		sort.Slice(po.endpoints, func(i, j int) bool { return po.endpoints[i].ID < po.endpoints[j].ID })
		slices.Sort(po.networks)
		recs := records[name]
		for _, ep := range po.endpoints {
			recs = append(recs, keyedRecord{endpointKey(name, ep.ID), ep.Rec})
		}
		sortKeyed(recs)
		po.peers, po.skipped = pickPeers(overlayOf(po.net), recs, d.host, d.cfg.HostAddr)
	}
	return planned, errors.Join(errs...)
}

// noteSkipped logs the records skipped now that were not before (and
// those no longer skipped), once each, and counts them in the metrics.
func (p *peerSync) noteSkipped(planned map[string]*plannedOverlay) {
	now := map[string]RecordProblem{}
	counts := map[string]int{}
	for _, po := range planned {
		for _, sk := range po.skipped {
			key := endpointKey(sk.Overlay, sk.Endpoint)
			now[key] = sk
			counts[sk.Kind]++
			if prev, ok := p.skipped[key]; !ok || prev.Reason != sk.Reason {
				p.d.log.Warn("endpoint record skipped: the rest of the overlay is programmed without it",
					"overlay", sk.Overlay, "endpoint", short(sk.Endpoint), "host", sk.Host, "ip", sk.IPv4, "mac", sk.MAC, "reason", sk.Reason)
			}
		}
	}
	for key, sk := range p.skipped {
		if _, ok := now[key]; !ok {
			p.d.log.Info("endpoint record no longer skipped", "overlay", sk.Overlay, "endpoint", short(sk.Endpoint), "host", sk.Host)
		}
	}
	p.skipped = now
	if m := p.d.cfg.Metrics; m != nil {
		m.Skipped(counts[SkipInvalid], counts[SkipConflict])
	}
}

// reconcile makes the kernel match the plan: overlays with a local
// endpoint exist with exactly their live remote peers; others are removed
// (unless part of the plan could not be read, or orphaned endpoints of
// this host are still to be looked at). It returns how many kernel changes
// it made.
func (p *peerSync) reconcile(ctx context.Context) (int, error) {
	d := p.d
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	planned, planErr := p.plan(ctx)
	p.noteSkipped(planned)
	errs := []error{planErr}
	unlock, err := d.lockHost(ctx)
	if err != nil {
		return 0, errors.Join(planErr, err)
	}
	defer unlock()
	wanted := map[uint32]bool{}
	changes := 0
	for _, po := range planned {
		vni := po.net.Overlay.VNI
		wanted[vni] = true
		if err := d.ensureOverlay(overlayOf(po.net)); err != nil {
			errs = append(errs, err)
			continue
		}
		c, err := d.cfg.Plane.SetPeers(vni, po.peers)
		changes += c
		if err != nil {
			errs = append(errs, err)
		}
	}
	// Orphaned endpoints of this host are not in the plan until restored
	// (restoreOrphans): removing their overlay first would delete the very
	// interfaces the restore looks for.
	if planErr == nil && !p.orphansPending(ctx) {
		// A Join may have built an overlay since the plan was made: hold
		// Joins off while removing, and keep what local endpoints use now.
		d.planeMu.Lock()
		defer d.planeMu.Unlock()
		present, err := d.cfg.Plane.Overlays()
		if err != nil {
			errs = append(errs, err)
		}
		inUse := d.localVNIs()
		for _, vni := range present {
			if wanted[vni] || inUse[vni] || p.kept[vni] {
				continue
			}
			if err := d.removeOverlay(vni); err != nil {
				errs = append(errs, err)
			} else {
				changes++
				d.log.Info("overlay removed from this host", "vni", vni)
			}
		}
	}
	if changes > 0 {
		d.log.Debug("reconciled", "overlays", len(planned), "changes", changes)
	}
	return changes, errors.Join(errs...)
}

// orphansPending reports whether this host has orphaned endpoints that
// restoreOrphans has yet to look at (or cannot tell).
func (p *peerSync) orphansPending(ctx context.Context) bool {
	if !p.restoreDue {
		return false
	}
	kvs, err := p.d.cfg.Store.List(ctx, orphansDir+"/"+p.d.host)
	return err != nil || len(kvs) > 0
}

// localVNIs are the VNIs of the overlays this process's local endpoints are on.
func (d *Driver) localVNIs() map[uint32]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	vnis := map[uint32]bool{}
	for _, ep := range d.endpoints {
		if n := d.networks[ep.Network]; n != nil {
			vnis[n.Overlay.VNI] = true
		}
	}
	return vnis
}

// known counts the endpoints (here and elsewhere) and live hosts in the mirrors.
func (p *peerSync) known() (local, remote, hosts int) {
	for _, rec := range p.endpoints {
		if rec.Host == p.d.host {
			local++
		} else {
			remote++
		}
	}
	return local, remote, len(p.hosts)
}

func peerOf(rec endpointRecord) (Peer, error) {
	host, err := netip.ParseAddr(rec.Host)
	if err != nil {
		return Peer{}, err
	}
	mac, err := net.ParseMAC(rec.MAC)
	if err != nil {
		return Peer{}, err
	}
	peer := Peer{Host: host, MAC: mac}
	for _, s := range []string{rec.IPv4, rec.IPv6} {
		if s == "" {
			continue
		}
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return Peer{}, err
		}
		peer.IPs = append(peer.IPs, pfx.Addr())
	}
	return peer, nil
}
