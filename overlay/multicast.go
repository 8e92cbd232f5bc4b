package overlay

// Multicast on VXLAN networks.
//
// The bridge snoops IGMPv3 and MLDv2 and is a querier itself, so it knows
// which of its endpoint ports joined which group (its MDB) and sends a
// group only there. IGMPv3/MLDv2 reports are link-local and so reach every
// host of the network like any broadcast; queries do too, and the bridges
// of a network then elect one querier among themselves as on any L2
// segment. Whichever host queries, every container is asked at least every
// querier interval (255 s); the membership interval is raised to twice
// that, so a change of querier never lets a membership expire. Leaves and
// removed endpoint ports end memberships at once.
//
// The VXLAN port never becomes a multicast router port (it would then get
// every group), so multicast leaves a host only for groups the caller says
// remote hosts want (SetGroups): a permanent MDB entry for the group on the
// VXLAN port of the bridge, and one entry per remote host in the VXLAN
// device's own MDB (kernel 6.3 and later), which replicates the group to
// exactly those hosts. Groups nobody wants stay on the host. Link-local
// IPv4 groups (224.0.0.0/24, which the bridge does not snoop) and groups
// the VXLAN MDB has no entry for go to every remote host through the
// all-zero FDB entries, as broadcasts do.
//
// GRE networks do not snoop: their bridge floods multicast to every
// tunnel, that is every remote host.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// mcastMembershipInterval is how long the bridge keeps a membership
	// nobody confirmed: twice the kernel's other-querier-present interval
	// (255 s by default) plus the query response interval (10 s).
	mcastMembershipInterval = 520 * time.Second
	// mcastResponseInterval is how long the querier lets listeners take
	// to answer (the kernel's default is 10 s).
	mcastResponseInterval = time.Second
)

// Netlink MDB attributes (linux/if_bridge.h; the VXLAN ones since 6.3).
const (
	mdbaMDB          = 1 // MDBA_MDB
	mdbaMDBEntry     = 1 // MDBA_MDB_ENTRY
	mdbaMDBEntryInfo = 1 // MDBA_MDB_ENTRY_INFO
	mdbaEattrSource  = 4 // MDBA_MDB_EATTR_SOURCE
	mdbaEattrDst     = 6 // MDBA_MDB_EATTR_DST
	mdbaSetEntry     = 1 // MDBA_SET_ENTRY
	mdbaSetAttrs     = 2 // MDBA_SET_ENTRY_ATTRS
	mdbeAttrDst      = 5 // MDBE_ATTR_DST

	mdbPermanent = 1 // MDB_PERMANENT

	brMDBEntryLen = 28 // sizeof(struct br_mdb_entry)
	brPortMsgLen  = 8  // sizeof(struct br_port_msg)

	mdbRouterDisabled = 0 // MDB_RTR_TYPE_DISABLED
)

// MDBEntry is one multicast forwarding entry: in the bridge's MDB (Dev is
// the bridge, Port the bridge port) or in the VXLAN device's (Dev and Port
// are the VXLAN device, Dst the remote host).
type MDBEntry struct {
	Dev, Port string
	Group     netip.Addr
	Source    netip.Addr // for a source-specific (S,G) entry; invalid otherwise
	Dst       netip.Addr // remote host of a VXLAN MDB entry; invalid otherwise
	Permanent bool       // set by the plugin (or an operator), not learned
}

// String prints the entry like `bridge mdb show`.
func (e MDBEntry) String() string {
	s := "dev " + e.Dev + " port " + e.Port + " grp " + e.Group.String()
	if e.Source.IsValid() {
		s += " src " + e.Source.String()
	}
	if e.Permanent {
		s += " permanent"
	} else {
		s += " temp"
	}
	if e.Dst.IsValid() {
		s += " dst " + e.Dst.String()
	}
	return s
}

// mdbEntry is an MDB entry as the kernel reports it, by interface index.
type mdbEntry struct {
	dev, port int
	group     netip.Addr
	source    netip.Addr
	dst       netip.Addr
	permanent bool
}

// Groups returns the multicast groups endpoints of this host joined on the
// network, as the bridge learned them from IGMP/MLD reports: its MDB
// entries on endpoint ports, sorted, each group once. The bridge does not
// track link-local IPv4 groups (224.0.0.0/24) nor ff02::1. A GRE network,
// which does not snoop, has none.
func (n *Network) Groups() ([]netip.Addr, error) {
	return inNetwork(n, func(s *handles) ([]netip.Addr, error) {
		info, err := readInfo(s.ov)
		if err != nil || info.encap != EncapVXLAN {
			return nil, err
		}
		dump, err := listMDB(s.ovNS)
		if err != nil {
			return nil, err
		}
		brIndex := info.br.Attrs().Index
		var groups []netip.Addr
		for _, e := range dump.entries {
			if e.dev != brIndex || e.port == brIndex || e.port == info.vx.Index {
				continue // another device's, the bridge's own, or remote
			}
			groups = append(groups, e.group)
		}
		slices.SortFunc(groups, func(a, b netip.Addr) int { return a.Compare(b) })
		return slices.Compact(groups), nil
	})
}

// SetGroups makes the network send each multicast group in remote to
// exactly the remote hosts listed for it (underlay addresses; this host's
// own is ignored), and no other group to any remote host, except what is
// always flooded (see the package's multicast notes). Entries the bridge
// learned itself on the VXLAN port are left to the kernel. It returns how
// many entries it added or removed. GRE networks flood every group to
// every host and are left as they are.
func (n *Network) SetGroups(remote map[netip.Addr][]netip.Addr) (int, error) {
	return n.program(func(s *handles, info netInfo) (int, error) {
		if info.encap != EncapVXLAN {
			return 0, nil
		}
		return setGroupsVXLAN(s.ovNS, info, remote)
	})
}

type groupHost struct{ group, host netip.Addr }

func setGroupsVXLAN(ns netns.NsHandle, info netInfo, remote map[netip.Addr][]netip.Addr) (int, error) {
	brIndex, vxIndex := info.br.Attrs().Index, info.vx.Index
	wantGroups := map[netip.Addr]bool{}
	wantDst := map[groupHost]bool{}
	for g, hosts := range remote {
		g = g.Unmap()
		if !g.IsMulticast() {
			return 0, fmt.Errorf("%s is not a multicast group", g)
		}
		for _, host := range hosts {
			host = host.Unmap()
			if !host.IsValid() || host.IsUnspecified() || host.IsMulticast() || host.Is4() != info.local.Is4() {
				return 0, fmt.Errorf("group %s: invalid remote host %v (local %s)", g, host, info.local)
			}
			if host == info.local {
				continue
			}
			wantGroups[g] = true
			wantDst[groupHost{g, host}] = true
		}
	}

	dump, err := listMDB(ns)
	if err != nil {
		return 0, err
	}
	haveGroups := map[netip.Addr]bool{} // permanent bridge entries on the VXLAN port
	learned := map[netip.Addr]bool{}    // temporary ones (snooped remote reports)
	haveDst := map[groupHost]bool{}
	for _, e := range dump.entries {
		switch {
		case e.dev == brIndex && e.port == vxIndex && !e.source.IsValid():
			if e.permanent {
				haveGroups[e.group] = true
			} else {
				learned[e.group] = true
			}
		case e.dev == vxIndex && e.dst.IsValid() && !e.source.IsValid():
			haveDst[groupHost{e.group, e.dst}] = true
		}
	}

	sock, err := rawSocket(ns)
	if err != nil {
		return 0, err
	}
	defer sock.Close()
	changes := 0
	// Replication lists first, then the bridge entries that send a group
	// into the VXLAN device: a new group never goes to every host on the
	// way, and a removed one stops before its list goes.
	vxlanMDB := dump.devs[vxIndex] // the kernel dumps an MDB for the VXLAN device
	if !vxlanMDB && len(wantDst) > 0 {
		noVXLANMDB()
	}
	if vxlanMDB {
		for gh := range wantDst {
			if haveDst[gh] {
				continue
			}
			err := changeMDB(sock, unix.RTM_NEWMDB, unix.NLM_F_CREATE|unix.NLM_F_EXCL, vxIndex, vxIndex, gh.group, gh.host)
			if errors.Is(err, unix.EEXIST) {
				continue
			}
			if err != nil {
				return changes, fmt.Errorf("add VXLAN MDB entry %s dst %s: %w", gh.group, gh.host, err)
			}
			changes++
		}
	}
	for g := range wantGroups {
		if haveGroups[g] {
			continue
		}
		flags := unix.NLM_F_CREATE | unix.NLM_F_EXCL
		if learned[g] {
			flags = unix.NLM_F_CREATE | unix.NLM_F_REPLACE // make the learned entry permanent
		}
		err := changeMDB(sock, unix.RTM_NEWMDB, flags, brIndex, vxIndex, g, netip.Addr{})
		if errors.Is(err, unix.EEXIST) {
			// A kernel that cannot replace (before 6.3) keeps the learned
			// entry, which forwards the group the same way until it expires.
			continue
		}
		if err != nil {
			return changes, fmt.Errorf("add MDB entry %s on %s: %w", g, VXLANDevice, err)
		}
		changes++
	}
	for g := range haveGroups {
		if wantGroups[g] {
			continue
		}
		if err := changeMDB(sock, unix.RTM_DELMDB, 0, brIndex, vxIndex, g, netip.Addr{}); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
			return changes, fmt.Errorf("delete MDB entry %s on %s: %w", g, VXLANDevice, err)
		}
		changes++
	}
	for gh := range haveDst {
		if wantDst[gh] && vxlanMDB {
			continue
		}
		if err := changeMDB(sock, unix.RTM_DELMDB, 0, vxIndex, vxIndex, gh.group, gh.host); err != nil && !errors.Is(err, unix.ENOENT) {
			return changes, fmt.Errorf("delete VXLAN MDB entry %s dst %s: %w", gh.group, gh.host, err)
		}
		changes++
	}
	return changes, nil
}

var noVXLANMDBOnce sync.Once

// noVXLANMDB logs once that the kernel cannot replicate a group to chosen
// hosts: groups then go to every remote host.
func noVXLANMDB() {
	noVXLANMDBOnce.Do(func() {
		slog.Warn("this kernel has no VXLAN MDB (Linux 6.3+): multicast groups with receivers on other hosts go to every remote host of the network")
	})
}

// setBridgeMulticast turns the bridge's IGMP/MLD snooping on, with its own
// querier (IGMPv3, MLDv2), a query response interval of a second (the
// listeners are local containers) and the membership interval above; or
// off.
func setBridgeMulticast(ns netns.NsHandle, br netlink.Link, snoop bool) error {
	// clock ticks (USER_HZ, 100 a second)
	ticks := func(d time.Duration) []byte { return nl.Uint64Attr(uint64(d / (10 * time.Millisecond))) }
	steps := [][]attr{{{nl.IFLA_BR_MCAST_SNOOPING, nl.Uint8Attr(0)}}}
	if snoop {
		steps = [][]attr{
			{ // Timers first: enabling the querier waits one response
				// interval before it prunes.
				{nl.IFLA_BR_MCAST_QUERY_RESPONSE_INTVL, ticks(mcastResponseInterval)},
				{nl.IFLA_BR_MCAST_MEMBERSHIP_INTVL, ticks(mcastMembershipInterval)},
				{nl.IFLA_BR_MCAST_IGMP_VERSION, nl.Uint8Attr(3)},
				{nl.IFLA_BR_MCAST_MLD_VERSION, nl.Uint8Attr(2)},
			},
			{
				{nl.IFLA_BR_MCAST_SNOOPING, nl.Uint8Attr(1)},
				{nl.IFLA_BR_MCAST_QUERIER, nl.Uint8Attr(1)},
			},
		}
	}
	for _, attrs := range steps {
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(br.Attrs().Index)
		req.AddData(msg)
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		for _, a := range attrs {
			data.AddRtAttr(a.typ, a.val)
		}
		req.AddData(info)
		if err := executeIn(ns, req, 0, nil); err != nil {
			return fmt.Errorf("%s multicast snooping settings: %w", BridgeDevice, err)
		}
	}
	return nil
}

type attr struct {
	typ int
	val []byte
}

// setMulticastRouter sets a bridge port's multicast router mode.
func setMulticastRouter(ns netns.NsHandle, port netlink.Link, mode uint8) error {
	req := nl.NewNetlinkRequest(unix.RTM_SETLINK, unix.NLM_F_ACK)
	msg := nl.NewIfInfomsg(unix.AF_BRIDGE)
	msg.Index = int32(port.Attrs().Index)
	req.AddData(msg)
	pi := nl.NewRtAttr(unix.IFLA_PROTINFO|unix.NLA_F_NESTED, nil)
	pi.AddRtAttr(nl.IFLA_BRPORT_MULTICAST_ROUTER, nl.Uint8Attr(mode))
	req.AddData(pi)
	if err := executeIn(ns, req, 0, nil); err != nil {
		return fmt.Errorf("bridge port %s: mcast_router %d: %w", port.Attrs().Name, mode, err)
	}
	return nil
}

// rawSocket opens a route netlink socket in ns, for the requests the
// netlink library has no call for (MDB, bridge multicast options).
func rawSocket(ns netns.NsHandle) (*nl.NetlinkSocket, error) {
	sock, err := nl.GetNetlinkSocketAt(ns, netns.None(), unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	tv := unix.NsecToTimeval(opTimeout.Nanoseconds())
	if err := errors.Join(sock.SetSendTimeout(&tv), sock.SetReceiveTimeout(&tv), sock.SetExtAck(true)); err != nil {
		sock.Close()
		return nil, fmt.Errorf("netlink socket timeout: %w", err)
	}
	return sock, nil
}

// executeIn runs req on sock, or on a socket of its own in ns when sock is nil.
func executeIn(ns netns.NsHandle, req *nl.NetlinkRequest, resType uint16, sock *nl.NetlinkSocket) error {
	_, err := execute(ns, req, resType, sock)
	return err
}

func execute(ns netns.NsHandle, req *nl.NetlinkRequest, resType uint16, sock *nl.NetlinkSocket) ([][]byte, error) {
	if sock == nil {
		s, err := rawSocket(ns)
		if err != nil {
			return nil, err
		}
		defer s.Close()
		sock = s
	}
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: sock}}
	return req.Execute(unix.NETLINK_ROUTE, resType)
}

// portMsg is struct br_port_msg.
type portMsg struct{ ifindex int }

func (m portMsg) Len() int { return brPortMsgLen }

func (m portMsg) Serialize() []byte {
	b := make([]byte, brPortMsgLen)
	b[0] = unix.AF_BRIDGE
	nl.NativeEndian().PutUint32(b[4:], uint32(m.ifindex))
	return b
}

// mdbDump is every MDB entry of a namespace, and the devices that have an
// MDB: bridges, and VXLAN devices where the kernel has VXLAN MDB (6.3+).
type mdbDump struct {
	entries []mdbEntry
	devs    map[int]bool
}

// listMDB dumps every MDB entry of the namespace: the bridge's and the
// VXLAN device's.
func listMDB(ns netns.NsHandle) (mdbDump, error) {
	for try := 0; ; try++ {
		out := mdbDump{devs: map[int]bool{}}
		req := nl.NewNetlinkRequest(unix.RTM_GETMDB, unix.NLM_F_DUMP)
		req.AddData(portMsg{})
		msgs, err := execute(ns, req, 0, nil) // dumped as RTM_GETMDB
		if errors.Is(err, netlink.ErrDumpInterrupted) && try < 5 {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("list MDB: %w", err)
		}
		for _, m := range msgs {
			dev, entries, err := parseMDBMsg(m)
			if err != nil {
				return out, fmt.Errorf("list MDB: %w", err)
			}
			out.devs[dev] = true
			out.entries = append(out.entries, entries...)
		}
		return out, nil
	}
}

// parseMDBMsg reads one message of an MDB dump: br_port_msg, then
// MDBA_MDB { MDBA_MDB_ENTRY { MDBA_MDB_ENTRY_INFO: br_mdb_entry + attributes }... }.
// It returns the device the message is about and its entries.
func parseMDBMsg(m []byte) (int, []mdbEntry, error) {
	if len(m) < brPortMsgLen {
		return 0, nil, errors.New("short MDB message")
	}
	dev := int(nl.NativeEndian().Uint32(m[4:]))
	attrs, err := nl.ParseRouteAttr(m[brPortMsgLen:])
	if err != nil {
		return dev, nil, err
	}
	var out []mdbEntry
	for _, a := range attrs {
		if a.Attr.Type&nl.NLA_TYPE_MASK != mdbaMDB {
			continue // MDBA_ROUTER
		}
		entries, err := nl.ParseRouteAttr(a.Value)
		if err != nil {
			return dev, nil, err
		}
		for _, e := range entries {
			if e.Attr.Type&nl.NLA_TYPE_MASK != mdbaMDBEntry {
				continue
			}
			infos, err := nl.ParseRouteAttr(e.Value)
			if err != nil {
				return dev, nil, err
			}
			for _, info := range infos {
				if info.Attr.Type&nl.NLA_TYPE_MASK != mdbaMDBEntryInfo {
					continue
				}
				me, ok, err := parseMDBEntry(dev, info.Value)
				if err != nil {
					return dev, nil, err
				}
				if ok {
					out = append(out, me)
				}
			}
		}
	}
	return dev, out, nil
}

// parseMDBEntry reads a struct br_mdb_entry and the attributes after it.
// It reports false for entries that are not IP groups (layer-2 ones).
func parseMDBEntry(dev int, b []byte) (mdbEntry, bool, error) {
	if len(b) < brMDBEntryLen {
		return mdbEntry{}, false, errors.New("short MDB entry")
	}
	e := mdbEntry{dev: dev, port: int(nl.NativeEndian().Uint32(b[0:])), permanent: b[4] == mdbPermanent}
	switch binary.BigEndian.Uint16(b[24:]) {
	case unix.ETH_P_IP:
		e.group = netip.AddrFrom4([4]byte(b[8:12]))
	case unix.ETH_P_IPV6:
		e.group = netip.AddrFrom16([16]byte(b[8:24]))
	default:
		return e, false, nil
	}
	attrs, err := nl.ParseRouteAttr(b[brMDBEntryLen:])
	if err != nil {
		return e, false, err
	}
	for _, a := range attrs {
		switch a.Attr.Type & nl.NLA_TYPE_MASK {
		case mdbaEattrSource:
			e.source, _ = netip.AddrFromSlice(a.Value)
		case mdbaEattrDst:
			e.dst, _ = netip.AddrFromSlice(a.Value)
		}
	}
	e.source, e.dst = e.source.Unmap(), e.dst.Unmap()
	return e, true, nil
}

// mdbSet is an MDBA_SET_ENTRY attribute: a struct br_mdb_entry for a
// permanent (*,G) entry on port.
func mdbSet(port int, group netip.Addr) []byte {
	b := make([]byte, brMDBEntryLen)
	nl.NativeEndian().PutUint32(b[0:], uint32(port))
	b[4] = mdbPermanent
	if group.Is4() {
		a := group.As4()
		copy(b[8:], a[:])
		binary.BigEndian.PutUint16(b[24:], unix.ETH_P_IP)
	} else {
		a := group.As16()
		copy(b[8:], a[:])
		binary.BigEndian.PutUint16(b[24:], unix.ETH_P_IPV6)
	}
	return b
}

// changeMDB adds (RTM_NEWMDB) or deletes (RTM_DELMDB) the permanent (*,G)
// entry of dev on port, with remote destination dst for a VXLAN MDB entry.
func changeMDB(sock *nl.NetlinkSocket, op uint16, flags int, dev, port int, group, dst netip.Addr) error {
	req := nl.NewNetlinkRequest(int(op), unix.NLM_F_ACK|flags)
	req.AddData(portMsg{ifindex: dev})
	req.AddData(nl.NewRtAttr(mdbaSetEntry, mdbSet(port, group)))
	if dst.IsValid() {
		attrs := nl.NewRtAttr(mdbaSetAttrs|unix.NLA_F_NESTED, nil)
		attrs.AddRtAttr(mdbeAttrDst, dst.AsSlice())
		req.AddData(attrs)
	}
	_, err := execute(netns.None(), req, 0, sock)
	return err
}

// readMDB reads the network's MDB entries for State, naming the devices.
func readMDB(ns netns.NsHandle, names map[int]string) ([]MDBEntry, error) {
	dump, err := listMDB(ns)
	if err != nil {
		return nil, err
	}
	out := make([]MDBEntry, 0, len(dump.entries))
	for _, e := range dump.entries {
		out = append(out, MDBEntry{
			Dev: names[e.dev], Port: names[e.port], Group: e.group, Source: e.source,
			Dst: e.dst, Permanent: e.permanent,
		})
	}
	slices.SortFunc(out, func(a, b MDBEntry) int {
		if a.Dev != b.Dev {
			return strings.Compare(a.Dev, b.Dev)
		}
		if c := a.Group.Compare(b.Group); c != 0 {
			return c
		}
		return strings.Compare(a.String(), b.String())
	})
	return out, nil
}
