package overlay

import (
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Verification. VerifyNetwork reads what a network has on this host and
// says how that differs from what EnsureNetwork and SetPeers make of a
// config and its peers, changing nothing: the devices and their settings
// (type, MTU, up, bridge port and port flags, the bridge's alias,
// multicast snooping and gateway addresses, where the VXLAN socket is),
// the endpoints' ports, the GRE tunnel ports, the forwarding and neighbour
// entries, and the source filter's members. What EnsureNetwork and
// SetPeers make, calling them again repairs (RepairReconcile); what this
// package did not make, RemoveDevice deletes (RepairRemove); an endpoint's
// port, whose other end is in a container, only a new endpoint replaces
// (RepairRecreate). Multicast group entries (SetGroups) are not compared.

// Want is what one network should have on this host.
type Want struct {
	NetworkConfig // as EnsureNetwork gets it
	// Peers and Hosts as SetPeers gets them.
	Peers []Peer
	Hosts []netip.Addr
	// Endpoints are the ids of the local endpoints: each has a port on the
	// bridge.
	Endpoints []string
	// Ignore are endpoints whose ports are neither wanted nor stray (an
	// orphaned endpoint's, say): they are not looked at.
	Ignore []string
}

// Kind says how something differs from what is wanted.
type Kind int

const (
	Missing Kind = iota + 1 // it should exist and does not
	Extra                   // it exists and should not
	Wrong                   // it exists, but not as it should
)

// Repair says what puts a Problem right; the zero Repair, nothing this
// package does (an operator has to).
type Repair int

const (
	// RepairReconcile: EnsureNetwork and SetPeers, called again. An Extra
	// problem of this kind is something no peer (or remote host) needs.
	RepairReconcile Repair = iota + 1
	// RepairRemove: RemoveDevice deletes the Device, which this package
	// did not make.
	RepairRemove
	// RepairRecreate: the endpoint's port is gone or not as it should be;
	// only a new endpoint puts it right (the other end of its veth is in
	// the container).
	RepairRecreate
)

// Problem is one difference between the kernel and what is wanted.
type Problem struct {
	Kind   Kind
	Repair Repair
	// What says what differs, for people. An endpoint's problem (Endpoint
	// set) does not name the endpoint, the caller does: What is then
	// "has no port on br0: ..." (Missing) or about its port, "dnp1234abcd-p
	// is down".
	What     string
	Endpoint string // the local endpoint whose port it is about
	Device   string // for RepairRemove, the device to delete
}

// Diff is how one network differs from what is wanted, and what was
// wanted, for a summary.
type Diff struct {
	Problems []Problem
	NetNS    string // the network's namespace
	// MTU is what the network's devices should have; 0 when unknown (no
	// device of the host namespace holds the local address): then MTUs
	// are not compared.
	MTU int
	// Devices are the devices the network should have besides its
	// endpoints' ports: "br0, vxlan0", or "br0, 2 GRE tunnel port(s)".
	Devices string
	// FDB and Neigh are how many forwarding and neighbour entries SetPeers
	// programs for the peers.
	FDB, Neigh int
}

// VerifyNetwork compares network want.ID with want. It returns ErrNotFound
// (wrapped) if the network has no namespace here, and an error if the
// kernel cannot be read or want is invalid.
func (h *Host) VerifyNetwork(want Want) (*Diff, error) {
	cfg := want.NetworkConfig
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(cfg.ID)
	if err != nil {
		return nil, err
	}
	defer s.close()
	v := &verifier{h: h, s: s, cfg: cfg, want: want, diff: &Diff{NetNS: h.nsPath(cfg.ID), MTU: cfg.MTU}}
	if v.diff.MTU == 0 {
		// 0 when the underlay is unknown: the caller reports that.
		v.diff.MTU, _ = maxMTU(s.host, cfg.LocalIP, cfg.encap(), cfg.Encrypted)
	}
	if err := v.run(); err != nil {
		return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
	}
	return v.diff, nil
}

// RemoveDevice deletes device name from network id's namespace: something
// VerifyNetwork found stray. A missing device or network is not an error.
func (h *Host) RemoveDevice(id, name string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(id)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer s.close()
	l, err := s.ov.LinkByName(name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("network %s: find %s: %w", id, name, err)
	}
	if err := deleteLink(s.ov, l); err != nil {
		return fmt.Errorf("network %s: %w", id, err)
	}
	return nil
}

// VXLANInUse returns the VXLAN devices of the host namespace that use
// VXLANPort, by VNI: another tool's (or Docker's own overlay's). A network
// of this package cannot have its VXLAN device there with such a VNI.
func (h *Host) VXLANInUse() (map[uint32]string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.openHost()
	if err != nil {
		return nil, err
	}
	defer s.close()
	links, err := dump(s.host.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	out := map[uint32]string{}
	for _, l := range links {
		if vx, ok := l.(*netlink.Vxlan); ok && vx.Port == VXLANPort {
			out[uint32(vx.VxlanId)] = vx.Name
		}
	}
	return out, nil
}

// fallbackDevices are the devices the kernel puts into every network
// namespace once a tunnel module is loaded (ip_gre, ipip, sit, ...): they
// are nobody's and cannot be deleted.
var fallbackDevices = map[string]bool{
	"gre0": true, "gretap0": true, "erspan0": true, "tunl0": true, "sit0": true,
	"ip6tnl0": true, "ip6gre0": true, "ip_vti0": true, "ip6_vti0": true,
}

// verifier is one VerifyNetwork.
type verifier struct {
	h    *Host
	s    *handles
	cfg  NetworkConfig
	want Want
	diff *Diff
}

func (v *verifier) add(kind Kind, repair Repair, what string) {
	v.diff.Problems = append(v.diff.Problems, Problem{Kind: kind, Repair: repair, What: what})
}

// wrong reports settings that reconciliation puts right.
func (v *verifier) wrong(whats ...string) {
	for _, what := range whats {
		v.add(Wrong, RepairReconcile, what)
	}
}

func (v *verifier) run() error {
	gre := v.cfg.encap() == EncapGRE
	if !gre {
		// Where the VXLAN socket must be, for vxlanMismatch.
		v.s.sockNS = v.s.hostNS
		if v.cfg.Encrypted {
			v.s.sockNS = netns.None()
			if ns, err := openNamedNS(v.h.cryptPath()); err == nil {
				v.s.cryptNS, v.s.sockNS = ns, ns // closed with s
			}
		}
	}
	br, err := v.devices()
	if err != nil {
		return err
	}
	if br == nil {
		return nil // no bridge: its problem says so
	}
	info, err := readInfo(v.s.ov)
	if err != nil {
		if len(v.diff.Problems) == 0 {
			v.wrong(err.Error())
		}
		return nil // the devices' problems say why
	}
	if info.encap != v.cfg.encap() {
		return nil // reported with the devices
	}
	p, err := planPeers(v.want.Peers, v.want.Hosts, v.cfg.LocalIP)
	if err != nil {
		return err
	}
	v.diff.Neigh = len(p.ips)
	if gre {
		v.diff.Devices = fmt.Sprintf("%s, %d GRE tunnel port(s)", BridgeDevice, len(p.hosts))
		v.diff.FDB = len(p.macs)
		ports, err := v.tunnels(br, p)
		if err != nil {
			return err
		}
		err = v.greFDB(p, ports)
		if err == nil {
			err = v.neighbours(p, br)
		}
		return err
	}
	v.diff.Devices = BridgeDevice + ", " + VXLANDevice
	if err := v.vxlanFDB(p, info.vx); err != nil {
		return err
	}
	if err := v.neighbours(p, br); err != nil {
		return err
	}
	return v.filter(p)
}

// devices compares the namespace's devices with the config; it returns
// the bridge (nil if there is none).
func (v *verifier) devices() (netlink.Link, error) {
	links, err := dump(v.s.ov.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	var br, vx netlink.Link
	for _, l := range links {
		switch l.Attrs().Name {
		case BridgeDevice:
			br = l
		case VXLANDevice:
			vx = l
		}
	}
	gre := v.cfg.encap() == EncapGRE
	mtu := v.diff.MTU
	if br == nil {
		v.add(Missing, RepairReconcile, "bridge "+BridgeDevice+" is missing")
	} else if b, ok := br.(*netlink.Bridge); !ok {
		v.wrong(fmt.Sprintf("%s is a %s device, not a bridge", BridgeDevice, br.Type()))
		br = nil
	} else {
		v.wrong(linkProblems(br, mtu, nil)...)
		if alias := v.cfg.bridgeAlias(); br.Attrs().Alias != alias {
			v.wrong(fmt.Sprintf("%s has alias %q, want %q", BridgeDevice, br.Attrs().Alias, alias))
		}
		// VXLAN: snooping (multicast.go); GRE floods.
		if snoop := b.MulticastSnooping; snoop != nil && *snoop == gre {
			v.wrong(fmt.Sprintf("%s has multicast snooping %s, want %s", BridgeDevice, onOff(*snoop), onOff(!gre)))
		}
		if err := v.gateways(br); err != nil {
			return nil, err
		}
	}
	switch {
	case gre && vx != nil:
		v.wrong(fmt.Sprintf("%s is there, but the network's encap is %s", VXLANDevice, EncapGRE))
	case !gre && vx == nil:
		v.add(Missing, RepairReconcile, "VXLAN device "+VXLANDevice+" is missing")
	case !gre:
		if why := vxlanMismatch(v.s, vx, v.cfg); why != "" {
			v.wrong(why)
		}
		if _, ok := vx.(*netlink.Vxlan); ok {
			v.wrong(linkProblems(vx, mtu, br)...)
			if err := v.portFlags(vx, br, false); err != nil {
				return nil, err
			}
		}
	}
	v.ports(links, br, vx)
	return br, nil
}

// ports compares the endpoints' ports with the wanted endpoints and
// reports the devices nobody wants as stray.
func (v *verifier) ports(links []netlink.Link, br, vx netlink.Link) {
	gre := v.cfg.encap() == EncapGRE
	local := map[string]bool{}
	for _, id := range v.want.Endpoints {
		local[id] = true
	}
	ports := map[string]bool{}
	for _, l := range links {
		a := l.Attrs()
		switch {
		case a.Name == "lo" || a.Name == BridgeDevice || (vx != nil && a.Name == VXLANDevice) || fallbackDevices[a.Name]:
			continue
		case gre && isTunnelName(a.Name):
			continue // tunnels checks them
		case l.Type() == "veth" && slices.Contains(v.want.Ignore, a.Alias):
			continue
		case l.Type() == "veth" && local[a.Alias]:
			ports[a.Alias] = true
			for _, what := range linkProblems(l, v.diff.MTU, br) {
				v.diff.Problems = append(v.diff.Problems, Problem{Kind: Wrong, Repair: RepairRecreate, What: what, Endpoint: a.Alias})
			}
			continue
		}
		why := "the plugin did not make it"
		if a.Alias != "" && l.Type() == "veth" {
			why = fmt.Sprintf("it was endpoint %s, which this host no longer has", short(a.Alias))
		}
		v.diff.Problems = append(v.diff.Problems, Problem{
			Kind: Extra, Repair: RepairRemove, Device: a.Name,
			What: fmt.Sprintf("stray %s device %s in namespace %s: %s", l.Type(), a.Name, v.diff.NetNS, why),
		})
	}
	for _, id := range v.want.Endpoints {
		if !ports[id] {
			v.diff.Problems = append(v.diff.Problems, Problem{
				Kind: Missing, Repair: RepairRecreate, Endpoint: id,
				What: "has no port on " + BridgeDevice + ": its container is cut off (or is starting or stopping right now)",
			})
		}
	}
}

// linkProblems says how a device is not up, has another MTU than mtu
// (unless 0) or (with master set) is not a port of master.
func linkProblems(l netlink.Link, mtu int, master netlink.Link) []string {
	var out []string
	a := l.Attrs()
	if a.Flags&net.FlagUp == 0 {
		out = append(out, a.Name+" is down")
	}
	if mtu > 0 && a.MTU != mtu {
		out = append(out, fmt.Sprintf("%s has MTU %d, want %d", a.Name, a.MTU, mtu))
	}
	if master != nil && a.MasterIndex != master.Attrs().Index {
		out = append(out, a.Name+" is not a port of "+master.Attrs().Name)
	}
	return out
}

// portFlags compares the flags of a tunnel's bridge port with what
// EnsureNetwork sets: learning off, ARP/ND suppression on and, for a GRE
// tunnel, isolation on.
func (v *verifier) portFlags(l, br netlink.Link, isolated bool) error {
	if br == nil || l.Attrs().MasterIndex != br.Attrs().Index {
		return nil // not a port: reported already
	}
	name := l.Attrs().Name
	pi, err := protinfo(v.s.ov, l)
	if err != nil {
		return fmt.Errorf("bridge port flags of %s: %w", name, err)
	}
	if pi.Learning {
		v.wrong(fmt.Sprintf("bridge port %s has learning on, want off", name))
	}
	if !pi.NeighSuppress {
		v.wrong(fmt.Sprintf("bridge port %s has neigh_suppress off, want on", name))
	}
	if isolated && !pi.Isolated {
		v.wrong(fmt.Sprintf("bridge port %s has isolated off, want on", name))
	}
	return nil
}

// gateways compares the bridge's global addresses with the config's
// gateways.
func (v *verifier) gateways(br netlink.Link) error {
	addrs, err := dump(func() ([]netlink.Addr, error) { return v.s.ov.AddrList(br, netlink.FAMILY_ALL) })
	if err != nil {
		return fmt.Errorf("list %s addresses: %w", BridgeDevice, err)
	}
	var have []netip.Prefix
	for _, a := range addrs {
		p, ok := addrPrefix(a)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		have = append(have, p)
		if !slices.Contains(v.cfg.Gateways, p) {
			v.wrong(fmt.Sprintf("%s has address %s, which is no gateway of the overlay", BridgeDevice, p))
		}
	}
	for _, p := range v.cfg.Gateways {
		if !slices.Contains(have, p) {
			v.wrong(fmt.Sprintf("%s lacks the gateway address %s", BridgeDevice, p))
		}
	}
	return nil
}

// tunnels compares a GRE network's tunnel ports with the remote hosts; it
// returns the interface indexes of the fitting ones, by remote host.
func (v *verifier) tunnels(br netlink.Link, p peerPlan) (map[int]netip.Addr, error) {
	tunnels, err := listTunnels(v.s.ov)
	if err != nil {
		return nil, err
	}
	have := map[string]netlink.Link{}
	for _, l := range tunnels {
		have[l.Attrs().Name] = l
	}
	hostID := hostNSID(v.s)
	ports := map[int]netip.Addr{}
	for _, remote := range p.hosts {
		name := tunnelName(remote)
		l := have[name]
		delete(have, name)
		if l == nil {
			v.add(Missing, RepairReconcile, fmt.Sprintf("GRE tunnel port %s to %s is missing", name, remote))
			continue
		}
		if why := tunnelMismatch(l, v.cfg.VNI, v.cfg.LocalIP, remote, hostID); why != "" {
			v.wrong(fmt.Sprintf("GRE tunnel port %s to %s: %s", name, remote, why))
			continue
		}
		ports[l.Attrs().Index] = remote
		v.wrong(linkProblems(l, v.diff.MTU, br)...)
		if err := v.portFlags(l, br, true); err != nil {
			return nil, err
		}
	}
	for _, name := range slices.Sorted(maps.Keys(have)) {
		v.add(Extra, RepairReconcile, fmt.Sprintf("stale GRE tunnel port %s to %s", name, tunnelRemote(have[name])))
	}
	return ports, nil
}

// vxlanFDB compares the forwarding entries SetPeers owns on a VXLAN
// network with the peers: in the VXLAN device's own table, per remote
// host an all-zero entry and per peer its MAC, to that host; on the
// bridge, a static entry per peer's MAC on the VXLAN port.
func (v *verifier) vxlanFDB(p peerPlan, vx *netlink.Vxlan) error {
	want := map[string]bool{}
	remote := func(mac net.HardwareAddr, host netip.Addr) string {
		return FDBEntry{MAC: mac, Dst: host, Self: true, State: nudString(netlink.NUD_PERMANENT)}.String()
	}
	for _, h := range p.hosts {
		want[remote(zeroMAC, h)] = true
	}
	for _, m := range p.macs {
		want[remote(m.mac, m.host)] = true
		want[FDBEntry{MAC: m.mac, State: nudString(netlink.NUD_NOARP)}.String()] = true
	}
	v.diff.FDB = len(want)
	fdb, err := dump(func() ([]netlink.Neigh, error) { return v.s.ov.NeighList(vx.Index, unix.AF_BRIDGE) })
	if err != nil {
		return fmt.Errorf("list FDB of %s: %w", VXLANDevice, err)
	}
	have := map[string]bool{}
	for _, e := range fdb {
		// Not the bridge's own (permanent) entry for the port's MAC.
		if fe := fdbEntryOf(e, VXLANDevice, netip.Addr{}); (fe.Self && fe.Dst.IsValid()) || (!fe.Self && e.State&netlink.NUD_NOARP != 0) {
			have[fe.String()] = true
		}
	}
	v.entries("forwarding (bridge fdb)", want, have)
	return nil
}

// greFDB compares the static bridge entries on a GRE network's fitting
// tunnel ports with the peers.
func (v *verifier) greFDB(p peerPlan, ports map[int]netip.Addr) error {
	isTunnel := map[int]bool{}
	for i := range ports {
		isTunnel[i] = true
	}
	current, err := currentGREFDB(v.s.ov, isTunnel)
	if err != nil {
		return err
	}
	want, have := map[string]bool{}, map[string]bool{}
	for _, m := range p.macs {
		want[FDBEntry{MAC: m.mac, Dst: m.host, State: nudString(netlink.NUD_NOARP)}.String()] = true
	}
	for _, e := range current {
		have[fdbEntryOf(e, "", ports[e.LinkIndex]).String()] = true
	}
	v.entries("forwarding (bridge fdb)", want, have)
	return nil
}

// neighbours compares the bridge's permanent neighbour entries with the
// peers' addresses.
func (v *verifier) neighbours(p peerPlan, br netlink.Link) error {
	current, err := currentNeigh(v.s.ov, br.Attrs().Index)
	if err != nil {
		return err
	}
	want, have := map[string]bool{}, map[string]bool{}
	for _, e := range neighTable(p, br.Attrs().Index) {
		ne, _ := neighEntryOf(e)
		want[ne.String()] = true
	}
	for _, e := range current {
		ne, _ := neighEntryOf(e)
		have[ne.String()] = true
	}
	v.entries("neighbour", want, have)
	return nil
}

// entries reports the entries of a kind missing from have, then those in
// have but not in want, each sorted.
func (v *verifier) entries(kind string, want, have map[string]bool) {
	for _, e := range slices.Sorted(maps.Keys(want)) {
		if !have[e] {
			v.add(Missing, RepairReconcile, fmt.Sprintf("%s entry missing: %s", kind, e))
		}
	}
	for _, e := range slices.Sorted(maps.Keys(have)) {
		if !want[e] {
			v.add(Extra, RepairReconcile, fmt.Sprintf("stale %s entry: %s", kind, e))
		}
	}
}

// filter compares the source filter (filter.go) with the network's remote
// hosts: it covers the VNI, and lets in the VXLAN of exactly the remote
// hosts, or for an encrypted network (whose members the encryption data
// path keeps) of none of them. A kernel without nftables has no filter.
func (v *verifier) filter(p peerPlan) error {
	st, err := v.h.filterState(v.s, v.cfg.VNI)
	if err != nil {
		return err
	}
	if st.Unavailable != "" {
		return nil
	}
	if !st.Filtered {
		v.add(Missing, RepairReconcile, fmt.Sprintf("the source filter does not cover VNI %d: VXLAN from any address reaches the network", v.cfg.VNI))
	}
	if v.cfg.Encrypted {
		return nil
	}
	for _, h := range p.hosts {
		if !slices.Contains(st.Members, h) {
			v.add(Missing, RepairReconcile, fmt.Sprintf("the source filter lacks member host %s: its VXLAN for the network is dropped", h))
		}
	}
	for _, h := range st.Members {
		if !slices.Contains(p.hosts, h) {
			v.add(Extra, RepairReconcile, fmt.Sprintf("stale source filter member %s", h))
		}
	}
	return nil
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
