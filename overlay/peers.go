package overlay

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"

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

// SetPeers makes the kernel's static entries match peers and hosts exactly:
// for every peer an FDB entry MAC -> HostIP on the VXLAN device, a static
// bridge FDB entry for its MAC on the VXLAN port and a permanent neighbour
// entry per IP on the bridge; for every remote host (hosts plus the peers'
// hosts) an all-zero FDB entry. Missing entries are added, stale ones
// removed, correct ones left alone; it returns how many it changed. Peers
// and hosts at this host's own address are ignored, so the caller may pass
// every endpoint of the network.
func (n *Network) SetPeers(peers []Peer, hosts []netip.Addr) (int, error) {
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if err != nil {
		return 0, err
	}
	defer s.close()
	vx, br, err := devices(s.ov)
	if err != nil {
		return 0, fmt.Errorf("network %s: %w", n.ID, err)
	}
	local, _ := netip.AddrFromSlice(vx.SrcAddr)
	want, err := desiredTables(peers, hosts, local.Unmap(), vx.Index, br.Attrs().Index)
	if err != nil {
		return 0, fmt.Errorf("network %s: %w", n.ID, err)
	}
	have, err := currentTables(s.ov, vx.Index, br.Attrs().Index)
	if err != nil {
		return 0, fmt.Errorf("network %s: %w", n.ID, err)
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
			return changes, fmt.Errorf("network %s: %s: %w", n.ID, t.name, err)
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

// desiredTables computes the entries peers and hosts call for, checking
// them for contradictions before anything is changed.
func desiredTables(peers []Peer, hosts []netip.Addr, local netip.Addr, vxIndex, brIndex int) (peerTables, error) {
	t := peerTables{fdb: table{}, bridge: table{}, neigh: table{}}
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
	addHost := func(ip netip.Addr) {
		t.fdb[fdbKey(zeroMAC, ip)] = vxlanFDB(vxIndex, zeroMAC, ip)
	}
	for _, ip := range hosts {
		ok, err := remote(ip)
		if err != nil {
			return t, err
		}
		if ok {
			addHost(ip.Unmap())
		}
	}
	macHost := map[string]netip.Addr{}
	ipMAC := map[netip.Addr]net.HardwareAddr{}
	for _, p := range peers {
		ok, err := remote(p.HostIP)
		if err != nil {
			return t, fmt.Errorf("peer %s: %w", p.MAC, err)
		}
		if !ok {
			continue // an endpoint of this host
		}
		hostIP := p.HostIP.Unmap()
		if len(p.MAC) != 6 || p.MAC[0]&1 != 0 || bytes.Equal(p.MAC, zeroMAC) {
			return t, fmt.Errorf("peer on %s: invalid MAC %q", hostIP, p.MAC)
		}
		if other, ok := macHost[p.MAC.String()]; ok && other != hostIP {
			return t, fmt.Errorf("MAC %s is on two hosts, %s and %s", p.MAC, other, hostIP)
		}
		macHost[p.MAC.String()] = hostIP
		addHost(hostIP)
		t.fdb[fdbKey(p.MAC, hostIP)] = vxlanFDB(vxIndex, p.MAC, hostIP)
		t.bridge[p.MAC.String()] = netlink.Neigh{
			LinkIndex: vxIndex, Family: unix.AF_BRIDGE, Flags: netlink.NTF_MASTER,
			State: netlink.NUD_NOARP, HardwareAddr: p.MAC,
		}
		for _, ip := range p.IPs {
			ip = ip.Unmap()
			if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() {
				return t, fmt.Errorf("peer %s: invalid address %v", p.MAC, ip)
			}
			if other, ok := ipMAC[ip]; ok && !bytes.Equal(other, p.MAC) {
				return t, fmt.Errorf("address %s belongs to two peers, %s and %s", ip, other, p.MAC)
			}
			ipMAC[ip] = p.MAC
			t.neigh[neighKey(ip, p.MAC)] = netlink.Neigh{
				LinkIndex: brIndex, Family: family(ip), State: netlink.NUD_PERMANENT,
				IP: ip.AsSlice(), HardwareAddr: p.MAC,
			}
		}
	}
	return t, nil
}

// currentTables reads the entries this package owns from the kernel.
func currentTables(ov *netlink.Handle, vxIndex, brIndex int) (peerTables, error) {
	t := peerTables{fdb: table{}, bridge: table{}, neigh: table{}}
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
			t.bridge[e.HardwareAddr.String()] = netlink.Neigh{
				LinkIndex: vxIndex, Family: unix.AF_BRIDGE, Flags: netlink.NTF_MASTER,
				State: netlink.NUD_NOARP, HardwareAddr: e.HardwareAddr,
			}
		}
	}
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
			t.neigh[neighKey(ip, e.HardwareAddr)] = netlink.Neigh{
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
