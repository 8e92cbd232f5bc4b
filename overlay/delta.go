package overlay

import (
	"fmt"
	"net/netip"
	"slices"
)

// Delta is a change to a network's remote endpoints and hosts, for
// UpdatePeers.
type Delta struct {
	// Add: endpoints to program (added, or replaced where they differ);
	// Remove: endpoints whose entries go.
	Add, Remove []Peer
	// AddHosts become remote hosts of the network; RemoveHosts stop being
	// remote hosts.
	AddHosts, RemoveHosts []netip.Addr
}

// UpdatePeers applies d to the kernel's entries without reading any table,
// so what it costs depends on d alone, not on how many entries the
// network has. In order:
//
//  1. AddHosts become remote hosts. VXLAN: the all-zero FDB entry to each,
//     and each is let in by the source filter (filter.go) or, for an
//     encrypted network, made a member of the data path. GRE: a tunnel
//     port to each (made, or replaced if it does not fit).
//  2. The entries of the Remove peers are deleted (those that are not
//     there are no error), except those the Add peers program again.
//  3. The entries of the Add peers are added, or replaced: a peer whose
//     MAC or addresses changed is a Remove of the old and an Add of the
//     new, or just an Add of the new when only its addresses were added to
//     or its MAC moved to another host.
//  4. RemoveHosts stop being remote hosts: what step 1 makes goes (with a
//     GRE tunnel port, every entry on it).
//
// The hosts of Add peers must be remote hosts already (from SetPeers or an
// earlier UpdatePeers) or be in AddHosts; for GRE, where each needs its
// tunnel port, that is checked. Peers and hosts at this host's own
// address are ignored, as with SetPeers, and d is checked the same way
// before anything changes (plus: no host both added and removed, no Add
// peer on a removed host). For an encrypted network SetPeers must have
// run once in this process: the data path is told whole member lists,
// kept in memory.
//
// UpdatePeers returns how many entries (and tunnel ports) it changed:
// requests the kernel carried out, not counting deletes of entries that
// were not there.
func (n *Network) UpdatePeers(d Delta) (int, error) {
	return n.program(func(s *handles, info netInfo) (int, error) {
		dp, err := planDelta(d, info.local)
		if err != nil {
			return 0, err
		}
		if info.encap == EncapGRE {
			return updatePeersGRE(s, info, dp)
		}
		return n.host.updatePeersVXLAN(s, info, dp)
	})
}

// deltaPlan is a Delta checked, with only what is remote.
type deltaPlan struct {
	add, remove           peerPlan
	addHosts, removeHosts []netip.Addr
}

func planDelta(d Delta, local netip.Addr) (deltaPlan, error) {
	var dp deltaPlan
	var err error
	if dp.add, err = planPeers(d.Add, nil, local); err != nil {
		return dp, fmt.Errorf("add: %w", err)
	}
	if dp.remove, err = planPeers(d.Remove, nil, local); err != nil {
		return dp, fmt.Errorf("remove: %w", err)
	}
	hosts, err := planPeers(nil, d.AddHosts, local)
	if err != nil {
		return dp, fmt.Errorf("add hosts: %w", err)
	}
	dp.addHosts = hosts.hosts
	if hosts, err = planPeers(nil, d.RemoveHosts, local); err != nil {
		return dp, fmt.Errorf("remove hosts: %w", err)
	}
	dp.removeHosts = hosts.hosts
	for _, h := range dp.removeHosts {
		if slices.Contains(dp.addHosts, h) {
			return dp, fmt.Errorf("host %s is both added and removed", h)
		}
		if slices.Contains(dp.add.hosts, h) {
			return dp, fmt.Errorf("host %s is removed, but a peer is added on it", h)
		}
	}
	return dp, nil
}

// again says which of the Remove peers' entries the Add peers program
// again, so that they are not deleted first: the kernel keeps one bridge
// FDB entry per MAC, one VXLAN FDB entry per unicast MAC and one
// neighbour entry per address, and an add replaces them.
type again struct {
	macs map[[6]byte]bool
	ips  map[netip.Addr]bool
}

func addedAgain(add peerPlan) again {
	a := again{macs: make(map[[6]byte]bool, len(add.macs)), ips: make(map[netip.Addr]bool, len(add.ips))}
	for _, m := range add.macs {
		a.macs[[6]byte(m.mac)] = true
	}
	for _, n := range add.ips {
		a.ips[n.ip] = true
	}
	return a
}

func (h *Host) updatePeersVXLAN(s *handles, info netInfo, dp deltaPlan) (int, error) {
	// New member hosts first: they may answer at once.
	if err := h.addMembers(s, info, dp.addHosts); err != nil {
		return 0, err
	}
	nl, err := openNL(s.ovNS)
	if err != nil {
		return 0, err
	}
	defer nl.close()
	vx, br := int32(info.vx.Index), int32(info.br.Attrs().Index)
	b := newBatch(nl)
	for _, host := range dp.addHosts {
		b.add(vxlanEntry(vx, [6]byte{}, host))
	}
	a := addedAgain(dp.add)
	for _, m := range dp.remove.macs {
		if !a.macs[[6]byte(m.mac)] {
			b.del(vxlanEntry(vx, [6]byte(m.mac), m.host))
			b.del(bridgeEntry(vx, [6]byte(m.mac)))
		}
	}
	for _, n := range dp.remove.ips {
		if !a.ips[n.ip] {
			b.del(neighEntry(br, n.ip, [6]byte(n.mac)))
		}
	}
	for _, m := range dp.add.macs {
		b.add(vxlanEntry(vx, [6]byte(m.mac), m.host))
		b.add(bridgeEntry(vx, [6]byte(m.mac)))
	}
	for _, n := range dp.add.ips {
		b.add(neighEntry(br, n.ip, [6]byte(n.mac)))
	}
	for _, host := range dp.removeHosts {
		b.del(vxlanEntry(vx, [6]byte{}, host))
	}
	if err := b.flush(); err != nil {
		return b.changes, err
	}
	return b.changes, h.removeMembers(s, info, dp.removeHosts)
}

// addMembers lets in the VXLAN (or for an encrypted network, the
// encrypted packets) of hosts, besides the other members.
func (h *Host) addMembers(s *handles, info netInfo, hosts []netip.Addr) error {
	if len(hosts) == 0 {
		return nil
	}
	if info.encrypted {
		return h.cryptUpdateMembers(info.vni, hosts, nil)
	}
	return h.filterAddMembers(s, info.vni, hosts)
}

// removeMembers undoes addMembers for hosts.
func (h *Host) removeMembers(s *handles, info netInfo, hosts []netip.Addr) error {
	if len(hosts) == 0 {
		return nil
	}
	if info.encrypted {
		return h.cryptUpdateMembers(info.vni, nil, hosts)
	}
	return h.filterRemoveMembers(s, info.vni, hosts)
}

func updatePeersGRE(s *handles, info netInfo, dp deltaPlan) (int, error) {
	// The tunnel port of each host the change concerns; 0: none (then a
	// removed peer's entries went with it).
	ports := map[netip.Addr]int32{}
	port := func(host netip.Addr) (int32, error) {
		if i, ok := ports[host]; ok {
			return i, nil
		}
		l, err := findTunnel(s.ov, host)
		if err != nil {
			return 0, err
		}
		if l != nil {
			ports[host] = int32(l.Attrs().Index)
		} else {
			ports[host] = 0
		}
		return ports[host], nil
	}
	// Before any change: the Add peers' hosts that are not being added
	// have their tunnel ports.
	for _, m := range dp.add.macs {
		if slices.Contains(dp.addHosts, m.host) {
			continue
		}
		i, err := port(m.host)
		if err != nil {
			return 0, err
		}
		if i == 0 {
			return 0, fmt.Errorf("peer %s: no GRE tunnel port to its host %s (add the host first)", m.mac, m.host)
		}
	}

	changes := 0
	hostID := hostNSID(s)
	for _, remote := range dp.addHosts {
		l, err := findTunnel(s.ov, remote)
		if err != nil {
			return changes, err
		}
		l, c, err := ensureTunnel(s, info, remote, l, hostID)
		changes += c
		if err != nil {
			return changes, err
		}
		ports[remote] = int32(l.Attrs().Index)
	}

	nl, err := openNL(s.ovNS)
	if err != nil {
		return changes, err
	}
	defer nl.close()
	br := int32(info.br.Attrs().Index)
	b := newBatch(nl)
	a := addedAgain(dp.add)
	for _, m := range dp.remove.macs {
		if a.macs[[6]byte(m.mac)] {
			continue
		}
		i, err := port(m.host)
		if err != nil {
			return changes, err
		}
		if i != 0 {
			b.del(bridgeEntry(i, [6]byte(m.mac)))
		}
	}
	for _, n := range dp.remove.ips {
		if !a.ips[n.ip] {
			b.del(neighEntry(br, n.ip, [6]byte(n.mac)))
		}
	}
	for _, m := range dp.add.macs {
		b.add(bridgeEntry(ports[m.host], [6]byte(m.mac)))
	}
	for _, n := range dp.add.ips {
		b.add(neighEntry(br, n.ip, [6]byte(n.mac)))
	}
	err = b.flush()
	changes += b.changes
	if err != nil {
		return changes, err
	}

	for _, remote := range dp.removeHosts {
		l, err := findTunnel(s.ov, remote)
		if err != nil {
			return changes, err
		}
		if l == nil {
			continue
		}
		if err := deleteLink(s.ov, l); err != nil {
			return changes, err
		}
		changes++
	}
	return changes, nil
}
