package overlay

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// greChecked is set once this kernel has been seen to make gretap devices.
var greChecked atomic.Bool

// greAvailable is Available(EncapGRE), remembering success: a kernel does
// not lose gretap support while it runs.
func greAvailable() error {
	if greChecked.Load() {
		return nil
	}
	if err := Available(EncapGRE); err != nil {
		return err
	}
	greChecked.Store(true)
	return nil
}

// greAliasTag starts the bridge alias of a GRE network.
const greAliasTag = "dnp:gre"

// greAlias is the alias of a GRE network's bridge: what a restarted
// process needs to know about the network before any tunnel exists.
func greAlias(vni uint32, local netip.Addr) string {
	return fmt.Sprintf("%s vni=%d local=%s", greAliasTag, vni, local)
}

// parseGREAlias reads greAlias; ok is false for any other alias.
func parseGREAlias(alias string) (vni uint32, local netip.Addr, ok bool) {
	f := strings.Fields(alias)
	if len(f) != 3 || f[0] != greAliasTag {
		return 0, netip.Addr{}, false
	}
	v, okV := strings.CutPrefix(f[1], "vni=")
	l, okL := strings.CutPrefix(f[2], "local=")
	if !okV || !okL {
		return 0, netip.Addr{}, false
	}
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil {
		return 0, netip.Addr{}, false
	}
	addr, err := netip.ParseAddr(l)
	if err != nil {
		return 0, netip.Addr{}, false
	}
	return uint32(n), addr, true
}

// tunnelName is the name of the tunnel port to remote in an overlay
// namespace: deterministic, so a restarted process finds it.
func tunnelName(remote netip.Addr) string {
	return greTunnelPrefix + hash8(remote.String())
}

// findTunnel returns the tunnel port to remote, or nil if there is none.
func findTunnel(ov *netlink.Handle, remote netip.Addr) (netlink.Link, error) {
	l, err := ov.LinkByName(tunnelName(remote))
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("find tunnel to %s: %w", remote, err)
	}
	return l, nil
}

// tempTunnelName is the name a tunnel has in the host namespace while it
// is being made. It differs per network (VNI) so that networks do not
// collide there, and is deterministic so that a leftover of an
// interrupted create is found and removed.
func tempTunnelName(vni uint32, remote netip.Addr) string {
	return greTempPrefix + hash8(fmt.Sprintf("%d %s", vni, remote))
}

func hash8(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:4])
}

// isTunnelName says whether name is one this package gives GRE tunnels
// (final or temporary). The kernel's own fallback devices (gre0, gretap0,
// erspan0) are not.
func isTunnelName(name string) bool {
	for _, prefix := range []string{greTunnelPrefix, greTempPrefix} {
		rest, ok := strings.CutPrefix(name, prefix)
		if ok && len(rest) == 8 && strings.Trim(rest, "0123456789abcdef") == "" {
			return true
		}
	}
	return false
}

// listTunnels returns the devices in the overlay namespace named like this
// package's GRE tunnels.
func listTunnels(ov *netlink.Handle) ([]netlink.Link, error) {
	links, err := dump(ov.LinkList)
	if err != nil {
		return nil, fmt.Errorf("list devices: %w", err)
	}
	var out []netlink.Link
	for _, l := range links {
		if isTunnelName(l.Attrs().Name) {
			out = append(out, l)
		}
	}
	return out, nil
}

// removeTunnels deletes every GRE tunnel of the overlay namespace (after a
// change to encap vxlan).
func removeTunnels(ov *netlink.Handle) error {
	tunnels, err := listTunnels(ov)
	if err != nil {
		return err
	}
	for _, l := range tunnels {
		if err := deleteLink(ov, l); err != nil {
			return err
		}
	}
	return nil
}

func deleteLink(h *netlink.Handle, l netlink.Link) error {
	if err := h.LinkDel(l); err != nil && !isNotFound(err) && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// hostNSID is the id of the host namespace as the overlay namespace sees
// it: the link namespace of a tunnel made in the host namespace. -1 if
// the kernel has assigned none (then no device refers to it yet).
func hostNSID(s *handles) int {
	id, err := s.ov.GetNetNsIdByFd(int(s.hostNS))
	if err != nil {
		return -1
	}
	return id
}

// tunnelMismatch says why an existing tunnel port does not fit ("" if it
// does): a gretap from local to remote with key vni both ways, its outer
// side in the host namespace, named for remote.
func tunnelMismatch(l netlink.Link, vni uint32, local, remote netip.Addr, hostID int) string {
	gt, ok := l.(*netlink.Gretap)
	switch {
	case l.Attrs().Name != tunnelName(remote):
		return "not named for its remote host"
	case !ok:
		return "not a gretap device"
	case gt.FlowBased:
		return "flow-based"
	case !gt.Local.Equal(net.IP(local.AsSlice())):
		return fmt.Sprintf("local %s, want %s", gt.Local, local)
	case !gt.Remote.Equal(net.IP(remote.AsSlice())):
		return fmt.Sprintf("remote %s, want %s", gt.Remote, remote)
	case gt.IKey != vni || gt.OKey != vni:
		return fmt.Sprintf("keys %d/%d, want %d", gt.IKey, gt.OKey, vni)
	case hostID < 0 || gt.NetNsID != hostID:
		return "its outer side is not in the host namespace"
	}
	return ""
}

// tunnelRemote is the remote address of a gretap device (invalid if none).
func tunnelRemote(l netlink.Link) netip.Addr {
	gt, ok := l.(*netlink.Gretap)
	if !ok {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(gt.Remote)
	return ip.Unmap()
}

// ensureGRE makes the overlay namespace fit a GRE network: no vxlan0, and
// every existing tunnel port either fitting cfg (then its port settings
// are repaired) or deleted, for SetPeers to make again.
func ensureGRE(s *handles, br netlink.Link, cfg NetworkConfig, mtu int) error {
	l, err := s.ov.LinkByName(VXLANDevice)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("find %s: %w", VXLANDevice, err)
	}
	if l != nil { // from an earlier encap=vxlan config
		if err := deleteLink(s.ov, l); err != nil {
			return err
		}
	}
	tunnels, err := listTunnels(s.ov)
	if err != nil {
		return err
	}
	hostID := hostNSID(s)
	for _, t := range tunnels {
		if why := tunnelMismatch(t, cfg.VNI, cfg.LocalIP, tunnelRemote(t), hostID); why != "" {
			slog.Info("deleting GRE tunnel", "network", cfg.ID, "tunnel", t.Attrs().Name, "reason", why)
			if err := deleteLink(s.ov, t); err != nil {
				return err
			}
			continue
		}
		if err := configurePort(s.ov, t, br, mtu); err != nil {
			return err
		}
	}
	return nil
}

// createTunnel makes the tunnel port to remote. The gretap device is made
// in the host namespace, where its outer packets are routed and received
// (the kernel keeps a tunnel's outer side in the namespace it was made
// in, also after the device moves), under a temporary name unique there,
// then moved into the overlay namespace and renamed. Creating it with a
// target namespace instead would, on kernels before 6.14, put the outer
// side in the overlay namespace, which has no underlay.
func createTunnel(s *handles, br netlink.Link, info netInfo, remote netip.Addr) (netlink.Link, error) {
	name, tmp := tunnelName(remote), tempTunnelName(info.vni, remote)
	mtu := br.Attrs().MTU
	// Leftovers of an interrupted create would hold the same tunnel
	// parameters, which the kernel refuses twice.
	for _, h := range []*netlink.Handle{s.host, s.ov} {
		l, err := h.LinkByName(tmp)
		if err != nil && !isNotFound(err) {
			return nil, fmt.Errorf("find %s: %w", tmp, err)
		}
		if l != nil {
			if err := deleteLink(h, l); err != nil {
				return nil, err
			}
		}
	}
	gt := &netlink.Gretap{
		LinkAttrs: netlink.LinkAttrs{Name: tmp, MTU: mtu},
		Local:     net.IP(info.local.AsSlice()),
		Remote:    net.IP(remote.AsSlice()),
		IKey:      info.vni,
		OKey:      info.vni,
		Ttl:       64,
		// PMtuDisc 0 (nopmtudisc): the outer header gets DF only when the
		// inner IPv4 packet has it (the kernel copies it); other frames
		// that do not fit the underlay are fragmented, inner DF packets
		// dropped. With the default MTU every frame fits.
	}
	if err := s.host.LinkAdd(gt); err != nil {
		if errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create GRE tunnel to %s: a tunnel from %s to %s with key %d already exists on this host (another network with VNI %d?): %w", remote, info.local, remote, info.vni, info.vni, err)
		}
		if errors.Is(err, unix.EOPNOTSUPP) {
			return nil, fmt.Errorf("create GRE tunnel to %s: %w", remote, ErrNoGRETap)
		}
		return nil, fmt.Errorf("create GRE tunnel to %s (key %d, local %s): %w", remote, info.vni, info.local, err)
	}
	l, err := s.host.LinkByName(tmp)
	if err != nil {
		return nil, fmt.Errorf("find new %s: %w", tmp, err)
	}
	if err := s.host.LinkSetNsFd(l, int(s.ovNS)); err != nil {
		deleteLink(s.host, l)
		return nil, fmt.Errorf("move %s into the overlay namespace: %w", tmp, err)
	}
	if l, err = s.ov.LinkByName(tmp); err != nil {
		return nil, fmt.Errorf("find moved %s: %w", tmp, err)
	}
	if err := s.ov.LinkSetName(l, name); err != nil {
		deleteLink(s.ov, l)
		return nil, fmt.Errorf("rename %s to %s: %w", tmp, name, err)
	}
	if l, err = s.ov.LinkByName(name); err != nil {
		return nil, fmt.Errorf("find new %s: %w", name, err)
	}
	if err := configurePort(s.ov, l, br, mtu); err != nil {
		return nil, err
	}
	return l, nil
}

// configurePort makes a tunnel an up port of br with the network's MTU,
// learning off (remote MACs come only from SetPeers), ARP/ND suppression
// on (requests for known remote addresses are answered on this host) and
// isolation on (split horizon: the bridge never forwards a frame from one
// tunnel port to another, so the full mesh has no loops).
func configurePort(ov *netlink.Handle, l netlink.Link, br netlink.Link, mtu int) error {
	name := l.Attrs().Name
	if l.Attrs().MTU != mtu {
		if err := ov.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("set %s MTU %d: %w", name, mtu, err)
		}
	}
	if l.Attrs().MasterIndex != br.Attrs().Index {
		if err := ov.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("attach %s to %s: %w", name, BridgeDevice, err)
		}
	}
	if err := ov.LinkSetLearning(l, false); err != nil {
		return fmt.Errorf("bridge port %s: learning off: %w", name, err)
	}
	if err := ov.LinkSetBrNeighSuppress(l, true); err != nil {
		return fmt.Errorf("bridge port %s: neigh_suppress on: %w", name, err)
	}
	if err := ov.LinkSetIsolated(l, true); err != nil {
		return fmt.Errorf("bridge port %s: isolated on: %w", name, err)
	}
	return setUp(ov, name)
}

// setPeersGRE makes the tunnel ports, bridge FDB entries and neighbour
// entries of a GRE network match p.
func setPeersGRE(s *handles, info netInfo, p peerPlan) (int, error) {
	want := map[string]netip.Addr{} // tunnel name -> remote host
	for _, h := range p.hosts {
		name := tunnelName(h)
		if other, ok := want[name]; ok {
			return 0, fmt.Errorf("hosts %s and %s would share the tunnel name %s", other, h, name)
		}
		want[name] = h
	}
	tunnels, err := listTunnels(s.ov)
	if err != nil {
		return 0, err
	}
	have := map[string]netlink.Link{}
	for _, l := range tunnels {
		have[l.Attrs().Name] = l
	}
	hostID := hostNSID(s)
	changes := 0

	// Tunnel ports to every remote host.
	ports := map[netip.Addr]int32{}
	for _, remote := range p.hosts {
		name := tunnelName(remote)
		l, c, err := ensureTunnel(s, info, remote, have[name], hostID)
		changes += c
		if err != nil {
			return changes, err
		}
		have[name] = l
		ports[remote] = int32(l.Attrs().Index)
	}

	// Static bridge FDB entries, on all tunnel ports (also on those about
	// to go, so every change is counted), and neighbour entries.
	nl, err := openNL(s.ovNS)
	if err != nil {
		return changes, err
	}
	defer nl.close()
	isTunnel := map[int32]bool{}
	for _, l := range have {
		isTunnel[int32(l.Attrs().Index)] = true
	}
	haveEntries, err := nl.dump(unix.AF_BRIDGE, func(m neighMsg) (entry, bool) {
		// Static entries of the bridge; not a port's own permanent entry,
		// nor a device's own (self) address list.
		ok := isTunnel[m.ifindex] && m.hasMAC && m.flags&unix.NTF_SELF == 0 && m.state&unix.NUD_NOARP != 0
		return bridgeEntry(m.ifindex, m.mac), ok
	})
	if err != nil {
		return changes, fmt.Errorf("list FDB: %w", err)
	}
	br := int32(info.br.Attrs().Index)
	neigh, err := currentNeighEntries(nl, br)
	if err != nil {
		return changes, err
	}
	c, err := syncEntries(nl, append(haveEntries, neigh...), func(yield func(entry) bool) {
		for _, m := range p.macs {
			if !yield(bridgeEntry(ports[m.host], [6]byte(m.mac))) {
				return
			}
		}
		for _, n := range p.ips {
			if !yield(neighEntry(br, n.ip, [6]byte(n.mac))) {
				return
			}
		}
	})
	changes += c
	if err != nil {
		return changes, err
	}

	// Tunnels to hosts that are gone (and leftovers of interrupted creates).
	names := make([]string, 0, len(have))
	for name := range have {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		if _, ok := want[name]; ok {
			continue
		}
		if err := deleteLink(s.ov, have[name]); err != nil {
			return changes, err
		}
		changes++
	}
	return changes, nil
}

// ensureTunnel makes l, the existing tunnel port named for remote (nil if
// there is none), fit: it keeps a fitting one (repairing its port
// settings), and replaces one that does not fit or makes a missing one.
// It returns the port and how many tunnels it deleted and created.
func ensureTunnel(s *handles, info netInfo, remote netip.Addr, l netlink.Link, hostID int) (netlink.Link, int, error) {
	changes := 0
	if l != nil {
		why := tunnelMismatch(l, info.vni, info.local, remote, hostID)
		if why == "" {
			return l, 0, fixPort(s.ov, l, info.br)
		}
		slog.Info("replacing GRE tunnel", "tunnel", l.Attrs().Name, "remote", remote, "reason", why)
		if err := deleteLink(s.ov, l); err != nil {
			return nil, 0, err
		}
		changes++
	}
	l, err := createTunnel(s, info.br, info, remote)
	if err != nil {
		return nil, changes, err
	}
	return l, changes + 1, nil
}

// currentGREFDB reads the static bridge FDB entries on the tunnel ports
// (by interface index) of a GRE network.
func currentGREFDB(ov *netlink.Handle, isTunnel map[int]bool) (table, error) {
	fdb, err := dump(func() ([]netlink.Neigh, error) { return ov.NeighList(0, unix.AF_BRIDGE) })
	if err != nil {
		return nil, fmt.Errorf("list FDB: %w", err)
	}
	have := table{}
	for _, e := range fdb {
		// Static entries of the bridge; not a port's own permanent entry,
		// nor a device's own (self) address list.
		if isTunnel[e.LinkIndex] && e.Flags&netlink.NTF_SELF == 0 && e.State&netlink.NUD_NOARP != 0 {
			have[greFDBKey(e.HardwareAddr, e.LinkIndex)] = bridgeFDB(e.LinkIndex, e.HardwareAddr)
		}
	}
	return have, nil
}

// fixPort repairs what can go wrong with a fitting tunnel port without a
// look at its bridge port flags (EnsureNetwork sets those): its MTU,
// master and state.
func fixPort(ov *netlink.Handle, l netlink.Link, br netlink.Link) error {
	a := l.Attrs()
	if a.MTU == br.Attrs().MTU && a.MasterIndex == br.Attrs().Index && a.Flags&net.FlagUp != 0 {
		return nil
	}
	return configurePort(ov, l, br, br.Attrs().MTU)
}

func greFDBKey(mac net.HardwareAddr, portIndex int) string {
	return fmt.Sprintf("%s port %d", mac, portIndex)
}
