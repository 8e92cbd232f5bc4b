package overlay

import (
	"bytes"
	"errors"
	"fmt"
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

// table is the desired or current content of one kind of entry, by key.
type table map[string]netlink.Neigh

// peerTables are the three kinds of entries SetPeers owns.
type peerTables struct {
	fdb    table // VXLAN device FDB (self): MAC -> remote host, plus 00:00:00:00:00:00 per host
	bridge table // bridge FDB (master) on the VXLAN port: remote MAC, static
	neigh  table // neighbour entries on the bridge: remote IP -> MAC, permanent
}

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
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if err != nil {
		return 0, err
	}
	defer s.close()
	info, err := readInfo(s.ov)
	if err != nil {
		return 0, fmt.Errorf("network %s: %w", n.ID, err)
	}
	p, err := planPeers(peers, hosts, info.local)
	if err != nil {
		return 0, fmt.Errorf("network %s: %w", n.ID, err)
	}
	var changes int
	if info.encap == EncapGRE {
		changes, err = setPeersGRE(s, info, p)
	} else {
		// The member hosts first: the new ones may answer at once. (Not
		// counted: changes are forwarding and neighbour entries.)
		if info.encrypted {
			_, err = h.cryptSetMembers(info.vni, p.hosts)
		} else {
			_, err = h.filterSetMembers(s, info.vni, p.hosts)
		}
		if err == nil {
			changes, err = setPeersVXLAN(s, info, p)
		}
	}
	if err != nil {
		return changes, fmt.Errorf("network %s: %w", n.ID, err)
	}
	return changes, nil
}

func setPeersVXLAN(s *handles, info netInfo, p peerPlan) (int, error) {
	vxIndex, brIndex := info.vx.Index, info.br.Attrs().Index
	want := vxlanTables(p, vxIndex, brIndex)
	have, err := currentTables(s.ov, vxIndex, brIndex)
	if err != nil {
		return 0, err
	}
	changes := 0
	for _, t := range []struct {
		name       string
		have, want table
		add        func(*netlink.Neigh) error
	}{
		// A VXLAN MAC may have several destinations (the zero MAC has one
		// per host): append, never replace.
		{"vxlan fdb", have.fdb, want.fdb, s.ov.NeighAppend},
		{"bridge fdb", have.bridge, want.bridge, s.ov.NeighSet},
		{"neighbour", have.neigh, want.neigh, s.ov.NeighSet},
	} {
		c, err := syncTable(s.ov, t.have, t.want, t.add)
		changes += c
		if err != nil {
			return changes, fmt.Errorf("%s: %w", t.name, err)
		}
	}
	return changes, nil
}

// syncTable deletes what is in have but not in want, then adds what is in
// want but not in have.
func syncTable(h *netlink.Handle, have, want table, add func(*netlink.Neigh) error) (int, error) {
	changes := 0
	for k, e := range have {
		if _, ok := want[k]; ok {
			continue
		}
		if err := h.NeighDel(&e); err != nil && !errors.Is(err, unix.ENOENT) {
			return changes, fmt.Errorf("delete %s: %w", k, err)
		}
		changes++
	}
	for k, e := range want {
		if _, ok := have[k]; ok {
			continue
		}
		if err := add(&e); err != nil {
			return changes, fmt.Errorf("add %s: %w", k, err)
		}
		changes++
	}
	return changes, nil
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
	macHost := map[string]netip.Addr{}
	ipMAC := map[netip.Addr]net.HardwareAddr{}
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
		other, seen := macHost[pe.MAC.String()]
		if seen && other != hostIP {
			return p, fmt.Errorf("MAC %s is on two hosts, %s and %s", pe.MAC, other, hostIP)
		}
		macHost[pe.MAC.String()] = hostIP
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

// vxlanTables are the entries a VXLAN network needs for p.
func vxlanTables(p peerPlan, vxIndex, brIndex int) peerTables {
	t := peerTables{fdb: table{}, bridge: table{}, neigh: neighTable(p, brIndex)}
	for _, ip := range p.hosts {
		t.fdb[fdbKey(zeroMAC, ip)] = vxlanFDB(vxIndex, zeroMAC, ip)
	}
	for _, m := range p.macs {
		t.fdb[fdbKey(m.mac, m.host)] = vxlanFDB(vxIndex, m.mac, m.host)
		t.bridge[m.mac.String()] = bridgeFDB(vxIndex, m.mac)
	}
	return t
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

// currentTables reads the entries this package owns from the kernel.
func currentTables(ov *netlink.Handle, vxIndex, brIndex int) (peerTables, error) {
	t := peerTables{fdb: table{}, bridge: table{}}
	fdb, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(vxIndex, unix.AF_BRIDGE) })
	if err != nil {
		return t, fmt.Errorf("list FDB of %s: %w", vxlanName, err)
	}
	for _, e := range fdb {
		switch {
		case e.Flags&netlink.NTF_SELF != 0:
			// The VXLAN device's own table is ours alone.
			ip, ok := netip.AddrFromSlice(e.IP)
			if !ok {
				continue
			}
			t.fdb[fdbKey(e.HardwareAddr, ip.Unmap())] = vxlanFDB(vxIndex, e.HardwareAddr, ip.Unmap())
		case e.State&netlink.NUD_NOARP != 0:
			// Static bridge entries on the port; not the bridge's own
			// ("permanent") entry for the port's MAC.
			t.bridge[e.HardwareAddr.String()] = bridgeFDB(vxIndex, e.HardwareAddr)
		}
	}
	t.neigh, err = currentNeigh(ov, brIndex)
	return t, err
}

// currentNeigh reads the bridge's permanent neighbour entries.
func currentNeigh(ov *netlink.Handle, brIndex int) (table, error) {
	t := table{}
	for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
		neighs, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(brIndex, fam) })
		if err != nil {
			return t, fmt.Errorf("list neighbours on %s: %w", bridgeName, err)
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

func vxlanFDB(vxIndex int, mac net.HardwareAddr, dst netip.Addr) netlink.Neigh {
	return netlink.Neigh{
		LinkIndex: vxIndex, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
		State: netlink.NUD_PERMANENT, HardwareAddr: mac, IP: dst.AsSlice(),
	}
}

func fdbKey(mac net.HardwareAddr, dst netip.Addr) string {
	return mac.String() + " dst " + dst.String()
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
