package driver

import (
	"bytes"
	"context"
	"net/netip"
	"slices"
)

// Changes one at a time. The full reconciliation (plan.go) reads every
// record and the kernel's tables, so its cost grows with the cluster. It
// runs on start, after a watch reset, when an overlay comes to this host
// or may go from it (its first or last local endpoint), when live hosts
// come or go, on a slow timer, and whenever a change cannot be applied on
// its own. Every other store event (an endpoint added, changed or removed
// on an overlay this host has) is applied as a delta: only its own
// entries are added or removed (none for this host's own endpoints), at a
// cost that does not depend on how many are programmed.
//
// A change is applied on its own only when it can make no other record win
// or lose: the record is well-formed and no other record of the overlay
// claims its MAC or any of its addresses (conflicts.go), before or after.
// Otherwise the overlay needs the full rules, and the next pass is full.

// Empty reports whether the delta changes nothing.
func (d PeerDelta) Empty() bool {
	return len(d.Add)+len(d.Remove)+len(d.AddHosts)+len(d.RemoveHosts) == 0
}

// overlayView is what the last full reconciliation programmed of one
// overlay, kept up to date by the deltas since.
type overlayView struct {
	ov     Overlay
	peers  map[string]Peer     // the peers the kernel should hold, by record key
	claims map[claimKey]int    // per MAC and address claim: well-formed records of live hosts making it
	hosts  map[netip.Addr]int  // peers per remote host
	own    int                 // this host's endpoint records on it (0: the overlay may have to go)
	before map[string]*Peer    // records changed since the last flush: the peer the kernel held (nil: none)
	seen   map[netip.Addr]bool // hosts touched since the last flush: whether the kernel had them
}

// newView is the view of an overlay programmed with picked, its records'
// claims counted in claims (pick).
func newView(ov Overlay, picked map[string]Peer, claims map[claimKey]int, own int) *overlayView {
	v := &overlayView{ov: ov, peers: picked, claims: claims, own: own, hosts: map[netip.Addr]int{},
		before: map[string]*Peer{}, seen: map[netip.Addr]bool{}}
	for _, p := range picked {
		v.hosts[p.Host]++
	}
	return v
}

// noteEndpoint is called for every endpoint record put or deleted (old
// and now are nil when there was or is no record), before the mirror
// changes. It applies the change to its overlay's view, or, when the
// change needs the full rules, asks for a full pass.
func (p *peerSync) noteEndpoint(key string, old, now *endpointRecord) {
	if p.full || p.views == nil {
		return
	}
	v := p.views[overlayOfKey(key)]
	own := (old != nil && old.Host == p.host) || (now != nil && now.Host == p.host)
	if v == nil {
		if own {
			p.full = true // an overlay comes to this host (or was not built)
		}
		return // else an overlay this host does not have
	}
	if _, ok := p.skipped[key]; ok {
		p.full = true // another record may win what it was refused
		return
	}
	if own {
		p.noteOwn(v, idOfKey(key), old, now)
		return
	}
	oldPeer, had := v.peers[key]
	if old != nil && p.hosts[old.Host] {
		if peer, err := validPeer(*old, v.ov, p.under); err == nil {
			if !had || v.contested(peer, 1) {
				p.full = true
				return
			}
			v.count(peer, -1)
		}
	}
	var newPeer Peer
	accepted := false
	if now != nil && p.hosts[now.Host] {
		peer, err := validPeer(*now, v.ov, p.under)
		if err != nil || v.contested(peer, 0) {
			p.full = true // to be skipped, and said so, by the full rules
			return
		}
		v.count(peer, 1)
		newPeer, accepted = peer, true
	}
	if !had && !accepted {
		return
	}
	if _, ok := v.before[key]; !ok {
		if had {
			v.before[key] = &oldPeer
		} else {
			v.before[key] = nil
		}
	}
	if had {
		v.touch(oldPeer.Host)
		v.hosts[oldPeer.Host]--
		delete(v.peers, key)
	}
	if accepted {
		v.touch(newPeer.Host)
		v.hosts[newPeer.Host]++
		v.peers[key] = newPeer
	}
	p.dirtyViews[v.ov.Name] = true
}

// noteOwn applies a change of one of this host's endpoint records on an
// overlay this host has: its claims count, it is no peer. The overlay may
// have to go with the last one (the next pass is then full), and a record
// of a live local endpoint that goes was not deleted by this host: it was
// orphaned, so the full pass looks after it.
func (p *peerSync) noteOwn(v *overlayView, id string, old, now *endpointRecord) {
	if old != nil {
		if old.Host != p.host || now == nil && p.isLocal(id) {
			p.full = true
			return
		}
		if peer, err := validPeer(*old, v.ov, p.under); err == nil {
			if v.contested(peer, 1) {
				p.full = true
				return
			}
			v.count(peer, -1)
		}
		v.own--
	}
	if now != nil {
		if now.Host != p.host {
			p.full = true // moved from this host to another
			return
		}
		peer, err := validPeer(*now, v.ov, p.under)
		if err != nil || v.contested(peer, 0) {
			p.full = true
			return
		}
		v.count(peer, 1)
		v.own++
	}
	if v.own <= 0 {
		p.full = true
	}
}

// overlayMayGo reports whether an overlay has no endpoint record of this
// host left: only the full reconciliation, which also knows the endpoints
// this process has, can tell whether it goes.
func (p *peerSync) overlayMayGo() bool {
	for _, v := range p.views {
		if v.own <= 0 {
			return true
		}
	}
	return false
}

// isLocal reports whether this process still has endpoint id.
func (p *peerSync) isLocal(id string) bool {
	for _, ep := range p.local.localEndpoints() {
		if ep.ID == id {
			return true
		}
	}
	return false
}

// contested reports whether a claim of peer is made by more than mine
// records of the overlay (mine: 1 when peer's is counted already, else 0).
func (v *overlayView) contested(peer Peer, mine int) bool {
	for _, c := range peerClaims(peer) {
		if v.claims[c] > mine {
			return true
		}
	}
	return false
}

func (v *overlayView) count(peer Peer, n int) {
	for _, c := range peerClaims(peer) {
		if v.claims[c] += n; v.claims[c] <= 0 {
			delete(v.claims, c)
		}
	}
}

// touch remembers whether the kernel had host before this flush's changes.
func (v *overlayView) touch(host netip.Addr) {
	if _, ok := v.seen[host]; !ok {
		v.seen[host] = v.hosts[host] > 0
	}
}

// delta is what changed in the view since the last flush, and starts the next.
func (v *overlayView) delta() PeerDelta {
	var d PeerDelta
	for key, was := range v.before {
		now, ok := v.peers[key]
		if was != nil && ok && samePeer(*was, now) {
			continue
		}
		if was != nil {
			d.Remove = append(d.Remove, *was)
		}
		if ok {
			d.Add = append(d.Add, now)
		}
	}
	for host, had := range v.seen {
		switch has := v.hosts[host] > 0; {
		case has && !had:
			d.AddHosts = append(d.AddHosts, host)
		case !has && had:
			d.RemoveHosts = append(d.RemoveHosts, host)
		}
		if v.hosts[host] <= 0 {
			delete(v.hosts, host)
		}
	}
	clear(v.before)
	clear(v.seen)
	return d
}

func samePeer(a, b Peer) bool {
	return a.Host == b.Host && bytes.Equal(a.MAC, b.MAC) && slices.Equal(a.IPs, b.IPs)
}

// flush programs the deltas of the overlays changed since the last pass.
// It returns how many kernel entries changed; on an error the next pass is
// full.
func (p *peerSync) flush(ctx context.Context) (int, error) {
	if len(p.dirtyViews) == 0 {
		return 0, nil
	}
	unlock, err := p.local.lockHost(ctx)
	if err != nil {
		p.full = true
		return 0, err
	}
	defer unlock()
	changes := 0
	for name := range p.dirtyViews {
		delete(p.dirtyViews, name)
		v := p.views[name]
		if v == nil {
			continue
		}
		d := v.delta()
		if d.Empty() {
			continue
		}
		n, err := p.plane.UpdatePeers(v.ov.VNI, d)
		changes += n
		if err != nil {
			p.full = true
			return changes, err
		}
	}
	return changes, nil
}
