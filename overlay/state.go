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
	ID       string
	NetNS    string
	VNI      uint32
	LocalIP  netip.Addr
	Port     int
	Learning bool // VXLAN learning; always false when set up by this package
	Links    []LinkState
	FDB      []FDBEntry   // forwarding entries on the VXLAN device
	Neigh    []NeighEntry // neighbour entries on the bridge
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

// FDBEntry is a forwarding entry for the VXLAN device: in the device's own
// table (Self, with a remote host Dst) or in the bridge's.
type FDBEntry struct {
	MAC   net.HardwareAddr
	Dst   netip.Addr // remote host; invalid for bridge entries
	Self  bool
	State string // permanent, static, reachable, ...
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
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if err != nil {
		return nil, err
	}
	defer s.close()
	st, err := readState(s.ov)
	if err != nil {
		return nil, fmt.Errorf("network %s: %w", n.ID, err)
	}
	st.ID, st.NetNS = n.ID, n.NetNS
	return st, nil
}

func readState(ov *netlink.Handle) (*State, error) {
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
		switch a.Name {
		case vxlanName:
			vx, _ = l.(*netlink.Vxlan)
		case bridgeName:
			br = l
		}
	}
	if vx != nil {
		st.VNI, st.Port, st.Learning = uint32(vx.VxlanId), vx.Port, vx.Learning
		if ip, ok := netip.AddrFromSlice(vx.SrcAddr); ok {
			st.LocalIP = ip.Unmap()
		}
		fdb, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(vx.Index, unix.AF_BRIDGE) })
		if err != nil {
			return nil, fmt.Errorf("list FDB of %s: %w", vxlanName, err)
		}
		for _, e := range fdb {
			fe := FDBEntry{MAC: e.HardwareAddr, Self: e.Flags&netlink.NTF_SELF != 0, State: nudString(e.State)}
			if ip, ok := netip.AddrFromSlice(e.IP); ok {
				fe.Dst = ip.Unmap()
			}
			st.FDB = append(st.FDB, fe)
		}
	}
	if br != nil {
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6} {
			neighs, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(br.Attrs().Index, fam) })
			if err != nil {
				return nil, fmt.Errorf("list neighbours on %s: %w", bridgeName, err)
			}
			for _, e := range neighs {
				if ip, ok := netip.AddrFromSlice(e.IP); ok {
					st.Neigh = append(st.Neigh, NeighEntry{IP: ip.Unmap(), MAC: e.HardwareAddr, State: nudString(e.State)})
				}
			}
		}
	}
	sort.Slice(st.FDB, func(i, j int) bool { return st.FDB[i].String() < st.FDB[j].String() })
	sort.Slice(st.Neigh, func(i, j int) bool { return st.Neigh[i].IP.Less(st.Neigh[j].IP) })
	return st, nil
}

// String prints the entry like `bridge fdb show`.
func (e FDBEntry) String() string {
	s := e.MAC.String()
	if e.Dst.IsValid() {
		s += " dst " + e.Dst.String()
	}
	if e.Self {
		s += " self"
	} else {
		s += " master " + bridgeName
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
