package driver

import (
	"context"
	"errors"
	"net"
	"net/netip"
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
}

// debounce lets a burst of store events become one reconciliation.
const debounce = 20 * time.Millisecond

func newPeerSync(d *Driver) *peerSync {
	return &peerSync{d: d, kickc: make(chan struct{}, 1), endpoints: map[string]endpointRecord{}, hosts: map[string]bool{}}
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
	hosts, err := p.d.cfg.Store.Watch(ctx, hostsDir)
	if err != nil {
		log.Error("cannot watch hosts", "err", err)
		return
	}
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
		case <-timer:
			timer = nil
			if p.haveEPs && p.haveHosts {
				if err := p.reconcile(ctx); err != nil {
					log.Warn("reconcile failed; retrying", "err", err)
					time.AfterFunc(time.Second, p.kick)
				}
			}
		}
	}
}

// register keeps this host's live key, retrying while the store is away,
// and releases it when ctx ends.
func (p *peerSync) register(ctx context.Context) {
	rec := hostRecord{Addr: p.d.host, Name: hostname(), Started: time.Now().UTC().Format(time.RFC3339)}
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		reg, err := p.d.cfg.Store.Register(ctx, hostKey(p.d.host), encode(rec), p.d.cfg.LiveTTL)
		if err == nil {
			p.d.log.Info("host registered", "host", p.d.host, "ttl", p.d.cfg.LiveTTL)
			<-ctx.Done()
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			reg.Release(rctx)
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

func (p *peerSync) applyEndpoint(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.endpoints = map[string]endpointRecord{}
		for _, kv := range ev.Snapshot {
			p.putEndpoint(kv)
		}
		p.haveEPs = true
	case store.EventPut:
		p.putEndpoint(ev.KV)
	case store.EventDelete:
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
	case store.EventPut:
		p.hosts[strings.TrimPrefix(ev.KV.Key, hostsDir+"/")] = true
	case store.EventDelete:
		delete(p.hosts, strings.TrimPrefix(ev.KV.Key, hostsDir+"/"))
	}
}

// overlayOfKey splits endpoints/<overlay>/<id>.
func overlayOfKey(key string) string {
	rest := strings.TrimPrefix(key, endpointsDir+"/")
	name, _, _ := strings.Cut(rest, "/")
	return name
}

// reconcile makes the kernel match the mirrors: overlays with a local
// endpoint exist with exactly their live remote peers; others are removed.
func (p *peerSync) reconcile(ctx context.Context) error {
	d := p.d
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	// Overlays needed here: those with a local endpoint, as the store says
	// or as this process knows (the watch may lag behind our own writes).
	needed := map[string]*localNetwork{}
	var errs []error
	addNeeded := func(netID string) {
		n, err := d.network(ctx, netID)
		if err != nil {
			errs = append(errs, err)
			return
		}
		needed[n.Overlay.Name] = n
	}
	for key, rec := range p.endpoints {
		if rec.Host == d.host {
			if _, ok := needed[overlayOfKey(key)]; !ok {
				addNeeded(rec.Network)
			}
		}
	}
	d.mu.Lock()
	var local []string
	for _, ep := range d.endpoints {
		local = append(local, ep.Network)
	}
	d.mu.Unlock()
	for _, netID := range local {
		addNeeded(netID)
	}

	peers := map[string][]Peer{}
	for key, rec := range p.endpoints {
		name := overlayOfKey(key)
		if rec.Host == d.host || !p.hosts[rec.Host] || needed[name] == nil {
			continue
		}
		peer, err := peerOf(rec)
		if err != nil {
			d.log.Warn("skipping endpoint", "key", key, "err", err)
			continue
		}
		peers[name] = append(peers[name], peer)
	}

	wanted := map[uint32]bool{}
	changes := 0
	for name, n := range needed {
		wanted[n.Overlay.VNI] = true
		if err := d.cfg.Plane.EnsureOverlay(overlayOf(n)); err != nil {
			errs = append(errs, err)
			continue
		}
		ps := peers[name]
		sort.Slice(ps, func(i, j int) bool { return ps[i].MAC.String() < ps[j].MAC.String() })
		c, err := d.cfg.Plane.SetPeers(n.Overlay.VNI, ps)
		changes += c
		if err != nil {
			errs = append(errs, err)
		}
	}
	present, err := d.cfg.Plane.Overlays()
	if err != nil {
		errs = append(errs, err)
	}
	for _, vni := range present {
		if !wanted[vni] {
			if err := d.cfg.Plane.RemoveOverlay(vni); err != nil {
				errs = append(errs, err)
			} else {
				changes++
				d.log.Info("overlay removed from this host", "vni", vni)
			}
		}
	}
	if changes > 0 {
		d.log.Debug("reconciled", "overlays", len(needed), "changes", changes)
	}
	return errors.Join(errs...)
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
