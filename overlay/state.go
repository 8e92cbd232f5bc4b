package overlay

import (
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// State is what the kernel holds for one network, for operators and tests.
type State struct {
	ID      string
	NetNS   string
	VNI     uint32
	LocalIP netip.Addr
	Port    int // VXLAN UDP port; 0 for GRE
	// Learning is VXLAN learning, or for GRE whether any tunnel port of the
	// bridge learns; always false when set up by this package.
	Learning bool
	Links    []LinkState
	FDB      []FDBEntry    // forwarding entries on the VXLAN device, or on the GRE tunnel ports
	Neigh    []NeighEntry  // neighbour entries on the bridge
	Encap    string        // "vxlan" or "gre"; "" if the namespace has neither
	Tunnels  []TunnelState // GRE tunnel ports, one per remote host
	// MDB is the multicast forwarding state: the bridge's entries (learned
	// on endpoint ports, set on the VXLAN port) and the VXLAN device's.
	MDB []MDBEntry
	// Encrypted: the network's VXLAN packets between hosts are encrypted;
	// SocketNS is where its VXLAN socket is: "host", "crypt" or "other".
	Encrypted bool
	SocketNS  string
	// Filter is what the source filter lets in for the VNI (VXLAN only).
	Filter FilterState
}

// TunnelState is one GRE tunnel port: the point-to-point tunnel to one
// remote host.
type TunnelState struct {
	Name   string
	Local  netip.Addr
	Remote netip.Addr
	IKey   uint32 // GRE keys; both are the VNI when set up by this package
	OKey   uint32
	// InHostNS says whether the tunnel's outer side (where its GRE
	// packets are routed) is the host namespace, as it must be.
	InHostNS bool
	// Bridge port flags: Learning off, NeighSuppress and Isolated on when
	// set up by this package.
	Learning      bool
	NeighSuppress bool
	Isolated      bool
}

// LinkState is one device of the network's namespace.
type LinkState struct {
	Name   string
	Type   string
	Alias  string // endpoint id, for endpoint ports
	MAC    net.HardwareAddr
	MTU    int
	Up     bool
	Master string
	Addrs  []netip.Prefix
}

// FDBEntry is a forwarding entry for a tunnel device: in the device's own
// table (Self; for VXLAN with a remote host Dst) or in the bridge's.
type FDBEntry struct {
	MAC  net.HardwareAddr
	Dst  netip.Addr // remote host; invalid for VXLAN bridge entries
	Self bool
	// State is permanent, static, reachable, ...
	State string
	// Dev is the device the entry is on (vxlan0, or a GRE tunnel port).
	// For a GRE tunnel port's bridge entries other than the port's own
	// (permanent) address, Dst is the tunnel's remote host.
	Dev string
}

// NeighEntry is a neighbour (ARP/ND) entry on the bridge.
type NeighEntry struct {
	IP    netip.Addr
	MAC   net.HardwareAddr
	State string
}

// State reads the network's devices, FDB and neighbour entries from the
// kernel.
func (n *Network) State() (*State, error) {
	return inNetwork(n, func(s *handles) (*State, error) {
		st, err := readState(s)
		if err != nil {
			return nil, err
		}
		st.ID, st.NetNS = n.ID, n.NetNS
		if st.Encap == EncapVXLAN {
			if st.Filter, err = n.host.filterState(s, st.VNI); err != nil {
				return nil, err
			}
			st.SocketNS = n.host.socketNS(s)
		}
		return st, nil
	})
}

func readState(s *handles) (*State, error) {
	ov := s.ov
	st := &State{}
	links, err := dump(ov.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var vx *netlink.Vxlan
	var br netlink.Link
	var tunnels []netlink.Link
	for _, l := range links {
		a := l.Attrs()
		ls := LinkState{
			Name: a.Name, Type: l.Type(), Alias: a.Alias, MAC: a.HardwareAddr, MTU: a.MTU,
			Up: a.Flags&net.FlagUp != 0, Master: names[a.MasterIndex],
		}
		addrs, err := dump(func() ([]netlink.Addr, error) { return ov.AddrList(l, netlink.FAMILY_ALL) })
		if err != nil {
			return nil, fmt.Errorf("list addresses of %s: %w", a.Name, err)
		}
		for _, ad := range addrs {
			if p, ok := addrPrefix(ad); ok {
				ls.Addrs = append(ls.Addrs, p)
			}
		}
		st.Links = append(st.Links, ls)
		switch {
		case a.Name == VXLANDevice:
			vx, _ = l.(*netlink.Vxlan)
		case a.Name == BridgeDevice:
			br = l
		case isTunnelName(a.Name):
			tunnels = append(tunnels, l)
		}
	}
	if br != nil {
		st.Encrypted = br.Attrs().Alias == encryptedAlias
	}
	if vx != nil {
		st.Encap = EncapVXLAN
		st.VNI, st.Port, st.Learning = uint32(vx.VxlanId), vx.Port, vx.Learning
		if ip, ok := netip.AddrFromSlice(vx.SrcAddr); ok {
			st.LocalIP = ip.Unmap()
		}
		fdb, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(vx.Index, unix.AF_BRIDGE) })
		if err != nil {
			return nil, fmt.Errorf("list FDB of %s: %w", VXLANDevice, err)
		}
		for _, e := range fdb {
			st.addFDB(fdbEntryOf(e, VXLANDevice, netip.Addr{}))
		}
	}
	if br != nil && vx == nil {
		if vni, local, ok := parseGREAlias(br.Attrs().Alias); ok {
			st.Encap, st.VNI, st.LocalIP = EncapGRE, vni, local
		}
	}
	if err := readTunnels(s, st, tunnels); err != nil {
		return nil, err
	}
	if br != nil {
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
			neighs, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(br.Attrs().Index, fam) })
			if err != nil {
				return nil, fmt.Errorf("list neighbours on %s: %w", BridgeDevice, err)
			}
			for _, e := range neighs {
				if ne, ok := neighEntryOf(e); ok {
					st.Neigh = append(st.Neigh, ne)
				}
			}
		}
	}
	if st.MDB, err = readMDB(s.ovNS, names); err != nil {
		return nil, err
	}
	sort.Slice(st.FDB, func(i, j int) bool { return st.FDB[i].String() < st.FDB[j].String() })
	sort.Slice(st.Neigh, func(i, j int) bool { return st.Neigh[i].IP.Less(st.Neigh[j].IP) })
	return st, nil
}

// readTunnels adds the GRE tunnel ports, their bridge port flags and
// their FDB entries to st.
func readTunnels(s *handles, st *State, tunnels []netlink.Link) error {
	if len(tunnels) == 0 {
		return nil
	}
	hostID := hostNSID(s)
	remotes := map[int]netip.Addr{}
	names := map[int]string{}
	for _, l := range tunnels {
		a := l.Attrs()
		ts := TunnelState{Name: a.Name, Remote: tunnelRemote(l)}
		if gt, ok := l.(*netlink.Gretap); ok {
			if ip, ok := netip.AddrFromSlice(gt.Local); ok {
				ts.Local = ip.Unmap()
			}
			ts.IKey, ts.OKey = gt.IKey, gt.OKey
			ts.InHostNS = hostID >= 0 && gt.NetNsID == hostID
		}
		if a.MasterIndex != 0 {
			pi, err := protinfo(s.ov, l)
			if err != nil {
				return fmt.Errorf("bridge port flags of %s: %w", a.Name, err)
			}
			ts.Learning, ts.NeighSuppress, ts.Isolated = pi.Learning, pi.NeighSuppress, pi.Isolated
			st.Learning = st.Learning || pi.Learning
		}
		st.Tunnels = append(st.Tunnels, ts)
		remotes[a.Index], names[a.Index] = ts.Remote, a.Name
	}
	fdb, err := dump(func() ([]netlink.Neigh, error) { return s.ov.NeighList(0, unix.AF_BRIDGE) })
	if err != nil {
		return fmt.Errorf("list FDB: %w", err)
	}
	for _, e := range fdb {
		name, ok := names[e.LinkIndex]
		if !ok {
			continue
		}
		var dst netip.Addr
		if e.Flags&netlink.NTF_SELF == 0 && e.State&netlink.NUD_PERMANENT == 0 {
			dst = remotes[e.LinkIndex]
		}
		st.addFDB(fdbEntryOf(e, name, dst))
	}
	sort.Slice(st.Tunnels, func(i, j int) bool { return st.Tunnels[i].Name < st.Tunnels[j].Name })
	return nil
}

// fdbEntryOf is the forwarding entry e on device dev. dst is the remote host
// of an entry that does not name one itself (a GRE tunnel port's).
func fdbEntryOf(e netlink.Neigh, dev string, dst netip.Addr) FDBEntry {
	fe := FDBEntry{MAC: e.HardwareAddr, Dst: dst, Self: e.Flags&netlink.NTF_SELF != 0, State: nudString(e.State), Dev: dev}
	if ip, ok := netip.AddrFromSlice(e.IP); ok {
		fe.Dst = ip.Unmap()
	}
	return fe
}

// neighEntryOf is the neighbour entry e; false if it has no IP address.
func neighEntryOf(e netlink.Neigh) (NeighEntry, bool) {
	ip, ok := netip.AddrFromSlice(e.IP)
	if !ok {
		return NeighEntry{}, false
	}
	return NeighEntry{IP: ip.Unmap(), MAC: e.HardwareAddr, State: nudString(e.State)}, true
}

// addFDB adds e to st.FDB unless it is there already: some kernels (6.1)
// report each bridge entry of a port twice in a dump, once for the port
// and once for the bridge.
func (st *State) addFDB(e FDBEntry) {
	for _, have := range st.FDB {
		if have.Dev == e.Dev && have.String() == e.String() {
			return
		}
	}
	st.FDB = append(st.FDB, e)
}

// protinfo reads a bridge port's flags, retrying a dump the kernel
// interrupted.
func protinfo(h *netlink.Handle, l netlink.Link) (netlink.Protinfo, error) {
	return dump(func() (netlink.Protinfo, error) { return h.LinkGetProtinfo(l) })
}

// String prints the entry like `bridge fdb show`, with the remote host
// (dst) also for a GRE tunnel port's bridge entries.
func (e FDBEntry) String() string {
	s := e.MAC.String()
	if e.Dst.IsValid() {
		s += " dst " + e.Dst.String()
	}
	if e.Self {
		s += " self"
	} else {
		s += " master " + BridgeDevice
	}
	return s + " " + e.State
}

// String prints the entry like `ip neigh show`.
func (e NeighEntry) String() string {
	return e.IP.String() + " lladdr " + e.MAC.String() + " " + e.State
}

func nudString(state int) string {
	switch {
	case state&netlink.NUD_PERMANENT != 0:
		return "permanent"
	case state&netlink.NUD_NOARP != 0:
		return "static"
	case state&netlink.NUD_REACHABLE != 0:
		return "reachable"
	case state&netlink.NUD_STALE != 0:
		return "stale"
	case state&netlink.NUD_DELAY != 0:
		return "delay"
	case state&netlink.NUD_PROBE != 0:
		return "probe"
	case state&netlink.NUD_INCOMPLETE != 0:
		return "incomplete"
	case state&netlink.NUD_FAILED != 0:
		return "failed"
	}
	return fmt.Sprintf("state %#x", state)
}

// socketNS says where the network's VXLAN socket is.
func (h *Host) socketNS(s *handles) string {
	l, err := s.ov.LinkByName(VXLANDevice)
	if err != nil {
		return ""
	}
	vx, ok := l.(*netlink.Vxlan)
	if !ok {
		return ""
	}
	if id, err := s.ov.GetNetNsIdByFd(int(s.hostNS)); err == nil && id >= 0 && vx.NetNsID == id {
		return "host"
	}
	if ns, err := openNamedNS(h.cryptPath()); err == nil {
		defer ns.Close()
		if id, err := s.ov.GetNetNsIdByFd(int(ns)); err == nil && id >= 0 && vx.NetNsID == id {
			return "crypt"
		}
	}
	return "other"
}
