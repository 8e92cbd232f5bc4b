package driver

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// plannedOverlay is what one overlay should be on this host.
type plannedOverlay struct {
	net       *localNetwork    // one of this host's Docker networks on it
	networks  []string         // every Docker network of this host on it
	endpoints []*localEndpoint // its endpoints on this host
	peers     []Peer           // its endpoints on other live hosts, by MAC
	skipped   []RecordProblem  // its records of live hosts skipped (conflicts.go)
	picked    map[string]Peer  // peers, by record key
	own       int              // its endpoint records of this host in the mirror
	claims    map[claimKey]int // per MAC and address claim, the well-formed records making it
}

// plan computes from the mirrors what this host's kernel should hold:
// every overlay with a local endpoint, as the store says or as this
// process knows (the watch may lag behind our own writes), with the
// endpoints of the other live hosts as its peers. Overlays whose network
// cannot be read are left out and named in the error.
func (p *peerSync) plan(ctx context.Context) (map[string]*plannedOverlay, error) {
	planned := map[string]*plannedOverlay{}
	var errs []error
	add := func(netID string) *plannedOverlay {
		n, err := p.local.network(ctx, netID)
		if err != nil {
			if _, gerr := p.st.Get(ctx, netmapKey(p.host, netID)); errors.Is(gerr, store.ErrNotFound) {
				// A stale endpoint record of a network this host no longer
				// has: nothing to build for it, and no reason to hold back.
				p.log.Debug("endpoint record names a network this host does not have", "network", short(netID))
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
		if rec.Host != p.host {
			continue
		}
		if po := add(rec.Network); po != nil {
			po.own++
			id := key[strings.LastIndex(key, "/")+1:]
			po.endpoints = append(po.endpoints, &localEndpoint{ID: id, Network: rec.Network, Rec: rec})
			seen[id] = true
		}
	}
	for _, ep := range p.local.localEndpoints() {
		if po := add(ep.Network); po != nil && !seen[ep.ID] {
			po.endpoints = append(po.endpoints, ep)
		}
	}

	records := map[string][]keyedRecord{}
	for key, rec := range p.endpoints {
		name := overlayOfKey(key)
		if rec.Host == p.host || !p.hosts[rec.Host] || planned[name] == nil {
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
		po.picked, po.skipped, po.claims = pick(overlayOf(po.net), recs, p.host, p.under)
		po.peers = sortedPeers(po.picked)
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
				p.log.Warn("endpoint record skipped: the rest of the overlay is programmed without it",
					"overlay", sk.Overlay, "endpoint", short(sk.Endpoint), "host", sk.Host, "ip", sk.IPv4, "mac", sk.MAC, "reason", sk.Reason)
			}
		}
	}
	for key, sk := range p.skipped {
		if _, ok := now[key]; !ok {
			p.log.Info("endpoint record no longer skipped", "overlay", sk.Overlay, "endpoint", short(sk.Endpoint), "host", sk.Host)
		}
	}
	p.skipped = now
	if m := p.metrics; m != nil {
		m.Skipped(counts[SkipInvalid], counts[SkipConflict])
	}
}

// reconcile makes the kernel match the plan: overlays with a local
// endpoint exist with exactly their live remote peers; others are removed
// (unless part of the plan could not be read, or orphaned endpoints of
// this host are still to be looked at). It returns how many kernel changes
// it made.
func (p *peerSync) reconcile(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()

	planned, planErr := p.plan(ctx)
	p.noteSkipped(planned)
	errs := []error{planErr}
	unlock, err := p.local.lockHost(ctx)
	if err != nil {
		return 0, errors.Join(planErr, err)
	}
	defer unlock()
	wanted := map[uint32]bool{}
	changes := 0
	// The views the deltas start from: of the overlays programmed in full.
	p.views = map[string]*overlayView{}
	clear(p.dirtyViews)
	for name, po := range planned {
		vni := po.net.Overlay.VNI
		wanted[vni] = true
		ov := overlayOf(po.net)
		if err := p.local.ensureOverlay(ov); err != nil {
			errs = append(errs, err)
			continue
		}
		c, err := p.plane.SetPeers(vni, po.peers)
		changes += c
		if err != nil {
			errs = append(errs, err)
			continue
		}
		p.views[name] = newView(ov, po.picked, po.claims, po.own)
	}
	// Orphaned endpoints of this host are not in the plan until restored
	// (restoreOrphans): removing their overlay first would delete the very
	// interfaces the restore looks for.
	if planErr == nil && !p.orphansPending(ctx) {
		// A Join may have built an overlay since the plan was made: hold
		// Joins off while removing, and keep what local endpoints use now.
		defer p.local.holdJoins()()
		present, err := p.plane.Overlays()
		if err != nil {
			errs = append(errs, err)
		}
		inUse := p.local.localVNIs()
		for _, vni := range present {
			if wanted[vni] || inUse[vni] || p.kept[vni] {
				continue
			}
			if err := p.local.removeOverlay(vni); err != nil {
				errs = append(errs, err)
			} else {
				changes++
				p.log.Info("overlay removed from this host", "vni", vni)
			}
		}
	}
	if changes > 0 {
		p.log.Debug("reconciled", "overlays", len(planned), "changes", changes)
	}
	return changes, errors.Join(errs...)
}

// orphansPending reports whether this host has orphaned endpoints that
// restoreOrphans has yet to look at (or cannot tell).
func (p *peerSync) orphansPending(ctx context.Context) bool {
	if !p.restoreDue {
		return false
	}
	kvs, err := p.st.List(ctx, orphansDir+"/"+p.host)
	return err != nil || len(kvs) > 0
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
