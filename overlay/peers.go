package overlay

import (
	"bytes"
	"fmt"
	"iter"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Peer is an endpoint of the network on another host.
type Peer struct {
	HostIP netip.Addr       // underlay address of the host holding it
	MAC    net.HardwareAddr // its MAC
	IPs    []netip.Addr     // its overlay addresses (IPv4 and/or IPv6)
}

// zeroMAC keys the FDB entries that replicate broadcast and unknown
// traffic (ARP, ND) to every remote host.
var zeroMAC = net.HardwareAddr{0, 0, 0, 0, 0, 0}

// table is the desired or current content of one kind of entry, by key
// (for VerifyNetwork; SetPeers works with entry values).
type table map[string]netlink.Neigh

// SetPeers makes the kernel's static entries match peers and hosts exactly.
// Peers and hosts at this host's own address are ignored, so the caller
// may pass every endpoint of the network. The remote hosts are hosts plus
// the peers' hosts.
//
// VXLAN: for every peer an FDB entry MAC -> HostIP on the VXLAN device, a
// static bridge FDB entry for its MAC on the VXLAN port and a permanent
// neighbour entry per IP on the bridge; for every remote host an all-zero
// FDB entry.
//
// The remote hosts are the only ones whose VXLAN packets for the network
// are let in (filter.go), or, for an encrypted network, whose encrypted
// packets the data path opens and to which it sends.
//
// GRE: for every remote host a tunnel port (created, or replaced if it
// does not fit, and deleted when the host is gone); for every peer a
// static bridge FDB entry for its MAC on its host's tunnel port and a
// permanent neighbour entry per IP on the bridge.
//
// Missing entries are added, stale ones removed, correct ones left alone;
// it returns how many it changed (entries and tunnel ports).
func (n *Network) SetPeers(peers []Peer, hosts []netip.Addr) (int, error) {
	return n.program(func(s *handles, info netInfo) (int, error) {
		p, err := planPeers(peers, hosts, info.local)
		if err != nil {
			return 0, err
		}
		if info.encap == EncapGRE {
			return setPeersGRE(s, info, p)
		}
		// The member hosts first: the new ones may answer at once. (Not
		// counted: changes are forwarding and neighbour entries.)
		if info.encrypted {
			_, err = n.host.cryptSetMembers(info.vni, p.hosts)
		} else {
			_, err = n.host.filterSetMembers(s, info.vni, p.hosts)
		}
		if err != nil {
			return 0, err
		}
		return setPeersVXLAN(s, info, p)
	})
}

// program runs fn with the host's lock held, on the network's namespace
// handles and what its kernel objects say of it, and names the network in
// fn's error. It returns fn's count of changes.
func (n *Network) program(fn func(s *handles, info netInfo) (int, error)) (int, error) {
	return inNetwork(n, func(s *handles) (int, error) {
		info, err := readInfo(s.ov)
		if err != nil {
			return 0, err
		}
		return fn(s, info)
	})
}

// inNetwork runs fn with the host's lock held, on the network's namespace
// handles, and names the network in fn's error.
func inNetwork[T any](n *Network, fn func(s *handles) (T, error)) (T, error) {
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if err != nil {
		var zero T
		return zero, err
	}
	defer s.close()
	v, err := fn(s)
	if err != nil {
		return v, fmt.Errorf("network %s: %w", n.ID, err)
	}
	return v, nil
}

func setPeersVXLAN(s *handles, info netInfo, p peerPlan) (int, error) {
	nl, err := openNL(s.ovNS)
	if err != nil {
		return 0, err
	}
	defer nl.close()
	vx, br := int32(info.vx.Index), int32(info.br.Attrs().Index)
	have, err := nl.dump(unix.AF_BRIDGE, func(m neighMsg) (entry, bool) {
		switch {
		case m.ifindex != vx || !m.hasMAC:
		case m.flags&unix.NTF_SELF != 0:
			// The VXLAN device's own table is ours alone.
			return vxlanEntry(vx, m.mac, m.ip), m.ip.IsValid()
		case m.state&unix.NUD_NOARP != 0:
			// Static bridge entries on the port; not the bridge's own
			// ("permanent") entry for the port's MAC.
			return bridgeEntry(vx, m.mac), true
		}
		return entry{}, false
	})
	if err != nil {
		return 0, fmt.Errorf("list FDB of %s: %w", VXLANDevice, err)
	}
	neigh, err := currentNeighEntries(nl, br)
	if err != nil {
		return 0, err
	}
	want := func(yield func(entry) bool) {
		for _, h := range p.hosts {
			if !yield(vxlanEntry(vx, [6]byte{}, h)) {
				return
			}
		}
		for _, m := range p.macs {
			if !yield(vxlanEntry(vx, [6]byte(m.mac), m.host)) || !yield(bridgeEntry(vx, [6]byte(m.mac))) {
				return
			}
		}
		for _, n := range p.ips {
			if !yield(neighEntry(br, n.ip, [6]byte(n.mac))) {
				return
			}
		}
	}
	return syncEntries(nl, append(have, neigh...), want)
}

// syncEntries deletes the entries of have that want does not yield, then
// adds those it yields that have lacks (want is read twice).
func syncEntries(nl *nlSocket, have []entry, want iter.Seq[entry]) (int, error) {
	wanted := make(map[entry]bool, len(have)) // have's entries: wanted or stale
	for _, e := range have {
		wanted[e] = false
	}
	for e := range want {
		if _, ok := wanted[e]; ok {
			wanted[e] = true
		}
	}
	b := newBatch(nl)
	for _, e := range have {
		if !wanted[e] {
			b.del(e)
		}
	}
	for e := range want {
		if _, ok := wanted[e]; !ok {
			b.add(e)
		}
	}
	err := b.flush()
	return b.changes, err
}

// currentNeighEntries reads the bridge's permanent neighbour entries.
func currentNeighEntries(nl *nlSocket, brIndex int32) ([]entry, error) {
	var out []entry
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		es, err := nl.dump(fam, func(m neighMsg) (entry, bool) {
			// Not those learned by the bridge itself (gateway traffic).
			ok := m.ifindex == brIndex && m.state&unix.NUD_PERMANENT != 0 && m.ip.IsValid()
			return neighEntry(brIndex, m.ip, m.mac), ok
		})
		if err != nil {
			return nil, fmt.Errorf("list neighbours on %s: %w", BridgeDevice, err)
		}
		out = append(out, es...)
	}
	return out, nil
}

// peerPlan is what peers and hosts call for, whatever the encapsulation,
// checked for contradictions before anything is changed.
type peerPlan struct {
	hosts []netip.Addr // remote hosts, sorted, each once
	macs  []peerMAC    // remote endpoints' MACs, each once
	ips   []peerIP     // their overlay addresses, each once
}

type peerMAC struct {
	mac  net.HardwareAddr
	host netip.Addr
}

type peerIP struct {
	ip  netip.Addr
	mac net.HardwareAddr
}

// planPeers checks peers and hosts and keeps the remote ones.
func planPeers(peers []Peer, hosts []netip.Addr, local netip.Addr) (peerPlan, error) {
	var p peerPlan
	remote := func(ip netip.Addr) (bool, error) {
		ip = ip.Unmap()
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() {
			return false, fmt.Errorf("invalid host address %v", ip)
		}
		if ip.Is4() != local.Is4() {
			return false, fmt.Errorf("host address %s is not of the underlay's family (local %s)", ip, local)
		}
		return ip != local, nil
	}
	hostSet := map[netip.Addr]bool{}
	for _, ip := range hosts {
		ok, err := remote(ip)
		if err != nil {
			return p, err
		}
		if ok {
			hostSet[ip.Unmap()] = true
		}
	}
	macHost := make(map[[6]byte]netip.Addr, len(peers))
	ipMAC := make(map[netip.Addr]net.HardwareAddr, len(peers))
	p.macs = make([]peerMAC, 0, len(peers))
	p.ips = make([]peerIP, 0, len(peers))
	for _, pe := range peers {
		ok, err := remote(pe.HostIP)
		if err != nil {
			return p, fmt.Errorf("peer %s: %w", pe.MAC, err)
		}
		if !ok {
			continue // an endpoint of this host
		}
		hostIP := pe.HostIP.Unmap()
		if len(pe.MAC) != 6 || pe.MAC[0]&1 != 0 || bytes.Equal(pe.MAC, zeroMAC) {
			return p, fmt.Errorf("peer on %s: invalid MAC %q", hostIP, pe.MAC)
		}
		other, seen := macHost[[6]byte(pe.MAC)]
		if seen && other != hostIP {
			return p, fmt.Errorf("MAC %s is on two hosts, %s and %s", pe.MAC, other, hostIP)
		}
		macHost[[6]byte(pe.MAC)] = hostIP
		hostSet[hostIP] = true
		if !seen {
			p.macs = append(p.macs, peerMAC{mac: pe.MAC, host: hostIP})
		}
		for _, ip := range pe.IPs {
			ip = ip.Unmap()
			if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() {
				return p, fmt.Errorf("peer %s: invalid address %v", pe.MAC, ip)
			}
			other, seen := ipMAC[ip]
			if seen && !bytes.Equal(other, pe.MAC) {
				return p, fmt.Errorf("address %s belongs to two peers, %s and %s", ip, other, pe.MAC)
			}
			ipMAC[ip] = pe.MAC
			if !seen {
				p.ips = append(p.ips, peerIP{ip: ip, mac: pe.MAC})
			}
		}
	}
	for ip := range hostSet {
		p.hosts = append(p.hosts, ip)
	}
	slices.SortFunc(p.hosts, func(a, b netip.Addr) int { return a.Compare(b) })
	return p, nil
}

// neighTable is the bridge's permanent neighbour entries for p.
func neighTable(p peerPlan, brIndex int) table {
	t := table{}
	for _, n := range p.ips {
		t[neighKey(n.ip, n.mac)] = netlink.Neigh{
			LinkIndex: brIndex, Family: family(n.ip), State: netlink.NUD_PERMANENT,
			IP: n.ip.AsSlice(), HardwareAddr: n.mac,
		}
	}
	return t
}

// bridgeFDB is a static bridge FDB entry for mac on the port.
func bridgeFDB(portIndex int, mac net.HardwareAddr) netlink.Neigh {
	return netlink.Neigh{
		LinkIndex: portIndex, Family: unix.AF_BRIDGE, Flags: netlink.NTF_MASTER,
		State: netlink.NUD_NOARP, HardwareAddr: mac,
	}
}

// currentNeigh reads the bridge's permanent neighbour entries.
func currentNeigh(ov *netlink.Handle, brIndex int) (table, error) {
	t := table{}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		neighs, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(brIndex, fam) })
		if err != nil {
			return t, fmt.Errorf("list neighbours on %s: %w", BridgeDevice, err)
		}
		for _, e := range neighs {
			ip, ok := netip.AddrFromSlice(e.IP)
			if !ok || e.State&netlink.NUD_PERMANENT == 0 {
				continue // learned by the bridge itself (gateway traffic)
			}
			ip = ip.Unmap()
			t[neighKey(ip, e.HardwareAddr)] = netlink.Neigh{
				LinkIndex: brIndex, Family: fam, State: netlink.NUD_PERMANENT,
				IP: ip.AsSlice(), HardwareAddr: e.HardwareAddr,
			}
		}
	}
	return t, nil
}

func neighKey(ip netip.Addr, mac net.HardwareAddr) string {
	return ip.String() + " lladdr " + mac.String()
}

func family(ip netip.Addr) int {
	if ip.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}
