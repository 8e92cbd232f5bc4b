package overlay

import (
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetworkConfig is what one overlay network should look like on this host.
type NetworkConfig struct {
	ID      string     // network id; names the namespace ([A-Za-z0-9_.-], up to 128)
	VNI     uint32     // VXLAN network identifier, 1..16777215
	Encap   string     // "vxlan" (default) or "gre"
	LocalIP netip.Addr // this host's advertise (underlay) address
	// MTU of the bridge, the tunnel devices and the veths. 0 means the MTU
	// of the device holding LocalIP minus the encapsulation overhead: for
	// VXLAN 50, or 70 for an IPv6 underlay; for GRE 42 (IPv4 underlay only).
	MTU int
	// Gateways, if any, are put on the bridge (address with prefix length):
	// a distributed gateway, the same address on every host, whose ARP/ND is
	// answered by the local bridge only. Empty means none.
	Gateways []netip.Prefix
	// Encrypted: the network's VXLAN packets between hosts are encrypted
	// (see encrypt.go; VXLAN over an IPv4 underlay only, and the Host needs
	// Encryption). The default MTU is then EncryptionOverhead smaller.
	Encrypted bool
}

func (c *NetworkConfig) validate() error {
	if err := validName("network id", c.ID); err != nil {
		return err
	}
	if c.ID == cryptID {
		return fmt.Errorf("network id %q is reserved", c.ID)
	}
	if c.VNI < 1 || c.VNI > 1<<24-1 {
		return fmt.Errorf("network %s: VNI %d out of range 1..16777215", c.ID, c.VNI)
	}
	if !c.LocalIP.IsValid() || c.LocalIP.IsUnspecified() || c.LocalIP.Is4In6() {
		return fmt.Errorf("network %s: invalid local (advertise) address %v", c.ID, c.LocalIP)
	}
	if c.MTU != 0 && (c.MTU < 68 || c.MTU > 65535) {
		return fmt.Errorf("network %s: MTU %d out of range 68..65535", c.ID, c.MTU)
	}
	for _, g := range c.Gateways {
		if !g.IsValid() || g.Addr().Is4In6() {
			return fmt.Errorf("network %s: invalid gateway %v", c.ID, g)
		}
	}
	return nil
}

// encap is the encapsulation with the default filled in.
func (c *NetworkConfig) encap() string {
	if c.Encap == "" {
		return EncapVXLAN
	}
	return c.Encap
}

// bridgeAlias is the alias of the network's bridge: what a restarted
// process needs to know about the network (readInfo).
func (c *NetworkConfig) bridgeAlias() string {
	switch {
	case c.encap() == EncapGRE:
		return greAlias(c.VNI, c.LocalIP)
	case c.Encrypted:
		return encryptedAlias
	}
	return ""
}

// Network is an overlay network that exists on this host. It is a small
// value describing the kernel objects; every method looks them up again.
type Network struct {
	ID      string
	VNI     uint32
	LocalIP netip.Addr
	MTU     int
	NetNS   string // path of the network's namespace
	Encap   string // "vxlan" or "gre"
	// Encrypted: VXLAN packets between hosts are encrypted.
	Encrypted bool

	host *Host
}

// EnsureNetwork makes the network's namespace, bridge and VXLAN device (or,
// for GRE, the bridge and the settings of its existing tunnel ports) exist
// as cfg says, reusing whatever is already right (so it is idempotent and
// finds what an earlier run created) and replacing what is wrong. If the
// VXLAN device had to be (re)created its FDB is empty, and GRE tunnels
// that no longer fit are deleted: call SetPeers after.
func (h *Host) EnsureNetwork(cfg NetworkConfig) (*Network, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	switch cfg.Encap {
	case "", EncapVXLAN:
	case EncapGRE:
		if err := greAvailable(); err != nil {
			return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
		}
		if !cfg.LocalIP.Is4() {
			return nil, fmt.Errorf("network %s: encap gre needs an IPv4 underlay (local address %s); use encap=vxlan", cfg.ID, cfg.LocalIP)
		}
	default:
		return nil, fmt.Errorf("network %s: unknown encap %q (want vxlan or gre)", cfg.ID, cfg.Encap)
	}
	if cfg.Encrypted {
		switch {
		case cfg.encap() != EncapVXLAN:
			return nil, fmt.Errorf("network %s: encryption works with encap vxlan only", cfg.ID)
		case !cfg.LocalIP.Is4():
			return nil, fmt.Errorf("network %s: encryption needs an IPv4 underlay (local address %s)", cfg.ID, cfg.LocalIP)
		case h.Encryption == nil:
			return nil, fmt.Errorf("network %s: %w", cfg.ID, ErrNoEncryption)
		}
	}

	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.openHost()
	if err != nil {
		return nil, err
	}
	defer s.close()

	mtu := cfg.MTU
	if mtu == 0 {
		if mtu, err = maxMTU(s.host, cfg.LocalIP, cfg.encap(), cfg.Encrypted); err != nil {
			return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
		}
	}

	path := h.nsPath(cfg.ID)
	ns, created, err := ensureNamedNS(path)
	if err != nil {
		return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
	}
	if err := s.openOverlay(ns); err != nil {
		return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
	}
	err = h.ensureVXLANSocket(s, cfg)
	if err == nil {
		err = ensureDevices(s, cfg, mtu)
	}
	if err != nil {
		if created { // leave nothing half-made behind
			if derr := deleteNetwork(s, path); derr != nil {
				slog.Warn("cleaning up after failed network create", "network", cfg.ID, "err", derr)
			}
		}
		return nil, fmt.Errorf("network %s: %w", cfg.ID, err)
	}
	return &Network{ID: cfg.ID, VNI: cfg.VNI, LocalIP: cfg.LocalIP, MTU: mtu, NetNS: path, Encap: cfg.encap(), Encrypted: cfg.Encrypted, host: h}, nil
}

// ensureVXLANSocket prepares where a VXLAN network's socket goes: for an
// encrypted network the crypt namespace with its data path, else the host
// namespace; either way the source filter covers the VNI before a socket
// for it exists.
func (h *Host) ensureVXLANSocket(s *handles, cfg NetworkConfig) error {
	if cfg.encap() != EncapVXLAN {
		return nil
	}
	if err := h.filterAddVNI(s, cfg.VNI); err != nil {
		return err
	}
	if !cfg.Encrypted {
		s.sockNS, s.sock = s.hostNS, s.host
		return nil
	}
	ns, err := h.ensureCrypt(cfg.LocalIP, cfg.VNI)
	if err != nil {
		return err
	}
	s.cryptNS = ns
	if s.crypt, err = newHandle(ns); err != nil {
		return fmt.Errorf("crypt namespace: %w", err)
	}
	s.sockNS, s.sock = s.cryptNS, s.crypt
	return nil
}

// ensureDevices makes the overlay namespace's devices match cfg.
func ensureDevices(s *handles, cfg NetworkConfig, mtu int) error {
	if err := setUp(s.ov, "lo"); err != nil {
		return err
	}
	br, err := ensureBridge(s.ov, mtu, cfg.bridgeAlias())
	if err != nil {
		return err
	}
	// VXLAN: snoop IGMP/MLD with a querier (see multicast.go); GRE floods.
	if err := setBridgeMulticast(s.ovNS, br, cfg.encap() == EncapVXLAN); err != nil {
		return err
	}
	if cfg.encap() == EncapGRE {
		err = ensureGRE(s, br, cfg, mtu)
	} else {
		err = ensureVXLAN(s, br, cfg, mtu)
	}
	if err != nil {
		return err
	}
	return ensureGateways(s.ov, br, cfg.Gateways)
}

// Network finds an existing network by id (after a restart, say). It
// returns ErrNotFound if the network has no namespace here.
func (h *Host) Network(id string) (*Network, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(id)
	if err != nil {
		return nil, err
	}
	defer s.close()
	info, err := readInfo(s.ov)
	if err != nil {
		return nil, fmt.Errorf("network %s: %w", id, err)
	}
	return &Network{
		ID: id, VNI: info.vni, LocalIP: info.local, MTU: info.br.Attrs().MTU,
		NetNS: h.nsPath(id), Encap: info.encap, Encrypted: info.encrypted, host: h,
	}, nil
}

// ListNetworks returns the ids of the networks that have a namespace here.
func (h *Host) ListNetworks() ([]string, error) {
	if err := validName("prefix", h.prefix()); err != nil {
		return nil, err
	}
	ids, err := namedNSes(h.dir(), h.prefix())
	return slices.DeleteFunc(ids, func(id string) bool { return id == cryptID }), err
}

// DeleteNetwork removes the network's namespace and every device in it,
// including the host ends of its endpoints. A missing network is not an
// error.
func (h *Host) DeleteNetwork(id string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(id)
	if errors.Is(err, ErrNotFound) {
		return removeNamedNS(h.nsPath(id)) // a stale unmounted file, if any
	}
	if err != nil {
		return err
	}
	defer s.close()
	info, infoErr := readInfo(s.ov)
	if err := deleteNetwork(s, h.nsPath(id)); err != nil {
		return fmt.Errorf("network %s: %w", id, err)
	}
	if infoErr != nil || info.encap != EncapVXLAN {
		return nil
	}
	// After the device: the VNI stays filtered while a socket has it.
	if info.encrypted {
		err = h.cryptRemove(info.vni)
	} else {
		err = h.filterRemoveVNI(s, info.vni)
	}
	if err != nil {
		return fmt.Errorf("network %s: %w", id, err)
	}
	return nil
}

// deleteNetwork deletes every device in the overlay namespace, then the
// namespace at path. The devices go explicitly rather than with the
// namespace, whose teardown is asynchronous and would keep the VXLAN socket
// (and its VNI) and the host ends of veths around for a while, or for good
// if another mount namespace still holds the namespace.
func deleteNetwork(s *handles, path string) error {
	links, err := dump(s.ov.LinkList)
	if err != nil {
		return fmt.Errorf("list devices: %w", err)
	}
	for _, l := range links {
		if l.Attrs().Name == "lo" {
			continue
		}
		if err := s.ov.LinkDel(l); err != nil && !isNotFound(err) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete %s: %w", l.Attrs().Name, err)
		}
	}
	return removeNamedNS(path)
}

// Available reports whether this kernel can carry encap ("vxlan" or "gre"),
// by creating a device of that kind in a throwaway namespace.
func Available(encap string) error {
	var link netlink.Link
	switch encap {
	case "", EncapVXLAN:
		link = &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, VxlanId: 1, Port: VXLANPort}
	case EncapGRE:
		// An IPv4 local address makes it a gretap (not ip6gretap) device,
		// the kind EnsureNetwork makes.
		link = &netlink.Gretap{
			LinkAttrs: netlink.LinkAttrs{Name: "probe0"},
			Local:     net.IPv4(127, 0, 0, 1), Remote: net.IPv4(127, 0, 0, 2), IKey: 1, OKey: 1,
		}
	default:
		return fmt.Errorf("unknown encap %q (want vxlan or gre)", encap)
	}
	err := inNewNetNS(func() error {
		h, err := newHandle(netns.None())
		if err != nil {
			return err
		}
		defer h.Close()
		return h.LinkAdd(link)
	})
	switch {
	case err == nil:
		return nil
	case encap == EncapGRE && errors.Is(err, unix.EOPNOTSUPP):
		return ErrNoGRETap
	default:
		return fmt.Errorf("kernel check for %s devices: %w", link.Type(), err)
	}
}

// MaxMTU is the largest MTU an overlay with encap ("" for VXLAN), encrypted
// or not, can have on this host: the MTU of the device holding local minus
// the encapsulation's (and encryption's) overhead. It is also the MTU
// EnsureNetwork gives a network without one.
func (h *Host) MaxMTU(local netip.Addr, encap string, encrypted bool) (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.openHost()
	if err != nil {
		return 0, err
	}
	defer s.close()
	return maxMTU(s.host, local, encap, encrypted)
}

func maxMTU(h *netlink.Handle, local netip.Addr, encap string, encrypted bool) (int, error) {
	under, err := underlayMTU(h, local)
	if err != nil {
		return 0, err
	}
	over := vxlanOverhead(local)
	if encap == EncapGRE {
		over = greOverhead
	}
	if encrypted {
		over += EncryptionOverhead
	}
	if encap == "" {
		encap = EncapVXLAN
	}
	if under-over < 68 {
		return 0, fmt.Errorf("underlay MTU %d too small for %s", under, encap)
	}
	return under - over, nil
}

// Underlay names the device of the host namespace that holds local (this
// host's underlay address), with its MTU.
func (h *Host) Underlay(local netip.Addr) (dev string, mtu int, err error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.openHost()
	if err != nil {
		return "", 0, err
	}
	defer s.close()
	l, err := underlayLink(s.host, local)
	if err != nil {
		return "", 0, err
	}
	return l.Attrs().Name, l.Attrs().MTU, nil
}

// underlayMTU is the MTU of the host device that holds addr.
func underlayMTU(h *netlink.Handle, addr netip.Addr) (int, error) {
	l, err := underlayLink(h, addr)
	if err != nil {
		return 0, err
	}
	return l.Attrs().MTU, nil
}

// underlayLink is the host device that holds addr.
func underlayLink(h *netlink.Handle, addr netip.Addr) (netlink.Link, error) {
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := dump(func() ([]netlink.Addr, error) { return h.AddrList(nil, family) })
	if err != nil {
		return nil, fmt.Errorf("list host addresses: %w", err)
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			l, err := h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("device of %s: %w", addr, err)
			}
			return l, nil
		}
	}
	return nil, fmt.Errorf("local address %s is on no device of the host namespace (set the MTU, or fix the advertise address)", addr)
}

// encryptedAlias marks the bridge of an encrypted VXLAN network.
const encryptedAlias = "dnp encrypted"

// netInfo is what the kernel says about a network's configuration.
type netInfo struct {
	encrypted bool
	encap     string
	vni       uint32
	local     netip.Addr
	br        netlink.Link
	vx        *netlink.Vxlan // the VXLAN device; nil for GRE
}

// readInfo finds a network's bridge and encapsulation: a VXLAN network by
// its vxlan0, a GRE network by the bridge's alias.
func readInfo(ov *netlink.Handle) (netInfo, error) {
	l, vxErr := ov.LinkByName(VXLANDevice)
	if vxErr != nil && !isNotFound(vxErr) {
		return netInfo{}, fmt.Errorf("find %s: %w", VXLANDevice, vxErr)
	}
	br, err := ov.LinkByName(BridgeDevice)
	if err != nil {
		return netInfo{}, fmt.Errorf("find %s (run EnsureNetwork): %w", BridgeDevice, err)
	}
	if l != nil {
		vx, ok := l.(*netlink.Vxlan)
		if !ok {
			return netInfo{}, fmt.Errorf("%s is a %s device, not vxlan (run EnsureNetwork)", VXLANDevice, l.Type())
		}
		local, _ := netip.AddrFromSlice(vx.SrcAddr)
		return netInfo{
			encap: EncapVXLAN, vni: uint32(vx.VxlanId), local: local.Unmap(), br: br, vx: vx,
			encrypted: br.Attrs().Alias == encryptedAlias,
		}, nil
	}
	if vni, local, ok := parseGREAlias(br.Attrs().Alias); ok {
		return netInfo{encap: EncapGRE, vni: vni, local: local, br: br}, nil
	}
	return netInfo{}, fmt.Errorf("find %s (run EnsureNetwork): %w", VXLANDevice, vxErr)
}

func setUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find %s: %w", name, err)
	}
	if l.Attrs().Flags&net.FlagUp != 0 {
		return nil
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

// ensureBridge makes br0 exist as an up bridge with the given MTU and alias.
func ensureBridge(ov *netlink.Handle, mtu int, alias string) (netlink.Link, error) {
	l, err := ov.LinkByName(BridgeDevice)
	if err != nil && !isNotFound(err) {
		return nil, fmt.Errorf("find %s: %w", BridgeDevice, err)
	}
	if l != nil {
		if _, ok := l.(*netlink.Bridge); !ok {
			if err := ov.LinkDel(l); err != nil {
				return nil, fmt.Errorf("delete non-bridge %s: %w", BridgeDevice, err)
			}
			l = nil
		}
	}
	if l == nil {
		off := false
		br := &netlink.Bridge{
			// A fixed MAC: otherwise the bridge takes its lowest port's
			// and changes it as ports come and go (bad for a gateway).
			LinkAttrs: netlink.LinkAttrs{Name: BridgeDevice, MTU: mtu, HardwareAddr: randomMAC()},
			// Off until ensureDevices sets it for the encapsulation.
			MulticastSnooping: &off,
		}
		if err := ov.LinkAdd(br); err != nil {
			return nil, fmt.Errorf("create %s: %w", BridgeDevice, err)
		}
		if l, err = ov.LinkByName(BridgeDevice); err != nil {
			return nil, fmt.Errorf("find new %s: %w", BridgeDevice, err)
		}
	}
	if l.Attrs().MTU != mtu {
		if err := ov.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("set %s MTU %d: %w", BridgeDevice, mtu, err)
		}
	}
	if l.Attrs().Alias != alias {
		if err := ov.LinkSetAlias(l, alias); err != nil {
			return nil, fmt.Errorf("set %s alias: %w", BridgeDevice, err)
		}
	}
	if err := setUp(ov, BridgeDevice); err != nil {
		return nil, err
	}
	return l, nil
}

// ensureVXLAN makes vxlan0 exist in the overlay namespace with its socket in
// the host namespace, as cfg says, as a port of br without learning and
// with ARP/ND suppression.
func ensureVXLAN(s *handles, br netlink.Link, cfg NetworkConfig, mtu int) error {
	// GRE tunnels from an earlier encap=gre config.
	if err := removeTunnels(s.ov); err != nil {
		return err
	}
	l, err := s.ov.LinkByName(VXLANDevice)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("find %s: %w", VXLANDevice, err)
	}
	if l != nil {
		if why := vxlanMismatch(s, l, cfg); why != "" {
			slog.Info("replacing VXLAN device", "network", cfg.ID, "reason", why)
			if err := s.ov.LinkDel(l); err != nil {
				return fmt.Errorf("delete wrong %s: %w", VXLANDevice, err)
			}
			l = nil
		}
	}
	if l == nil {
		vx := &netlink.Vxlan{
			// Created by the host (or crypt) handle with a target
			// namespace: the device appears in the overlay namespace while
			// its UDP socket stays in the host (crypt) namespace.
			LinkAttrs: netlink.LinkAttrs{Name: VXLANDevice, MTU: mtu, Namespace: netlink.NsFd(s.ovNS)},
			VxlanId:   int(cfg.VNI),
			SrcAddr:   net.IP(cfg.LocalIP.AsSlice()),
			Port:      VXLANPort,
			Learning:  false,
		}
		if err := s.sock.LinkAdd(vx); err != nil {
			if errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("create %s: VNI %d is already used by another VXLAN device of this host: %w", VXLANDevice, cfg.VNI, err)
			}
			return fmt.Errorf("create %s (VNI %d, local %s): %w", VXLANDevice, cfg.VNI, cfg.LocalIP, err)
		}
		if l, err = s.ov.LinkByName(VXLANDevice); err != nil {
			return fmt.Errorf("find new %s: %w", VXLANDevice, err)
		}
	}
	if l.Attrs().MTU != mtu {
		if err := s.ov.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("set %s MTU %d: %w", VXLANDevice, mtu, err)
		}
	}
	if l.Attrs().MasterIndex != br.Attrs().Index {
		if err := s.ov.LinkSetMaster(l, br); err != nil {
			return fmt.Errorf("attach %s to %s: %w", VXLANDevice, BridgeDevice, err)
		}
	}
	// Remote MACs come only from SetPeers, never from traffic.
	if err := s.ov.LinkSetLearning(l, false); err != nil {
		return fmt.Errorf("bridge port %s: learning off: %w", VXLANDevice, err)
	}
	// Answer ARP/ND for known remote addresses on this host instead of
	// sending the request to every remote host.
	if err := s.ov.LinkSetBrNeighSuppress(l, true); err != nil {
		return fmt.Errorf("bridge port %s: neigh_suppress on: %w", VXLANDevice, err)
	}
	// Never a multicast router port, which would get every group: remote
	// hosts get the groups SetGroups names.
	if err := setMulticastRouter(s.ovNS, l, mdbRouterDisabled); err != nil {
		return err
	}
	return setUp(s.ov, VXLANDevice)
}

// vxlanMismatch says why an existing vxlan0 does not fit cfg ("" if it
// does): EnsureNetwork then replaces it, VerifyNetwork reports it.
func vxlanMismatch(s *handles, l netlink.Link, cfg NetworkConfig) string {
	vx, ok := l.(*netlink.Vxlan)
	switch {
	case !ok:
		return fmt.Sprintf("%s is a %s device, not vxlan", VXLANDevice, l.Type())
	case vx.VxlanId != int(cfg.VNI):
		return fmt.Sprintf("%s has VNI %d, want %d", VXLANDevice, vx.VxlanId, cfg.VNI)
	case !vx.SrcAddr.Equal(net.IP(cfg.LocalIP.AsSlice())):
		return fmt.Sprintf("%s sends from %s, want %s", VXLANDevice, vx.SrcAddr, cfg.LocalIP)
	case vx.Port != VXLANPort:
		return fmt.Sprintf("%s uses UDP port %d, want %d", VXLANDevice, vx.Port, VXLANPort)
	case vx.Learning:
		return VXLANDevice + " learns MACs from traffic; it must only have the entries the plugin programs"
	case vx.Proxy || vx.L2miss || vx.L3miss || vx.FlowBased:
		return VXLANDevice + " has proxy, miss or flow-based mode on"
	case vx.Group != nil && !vx.Group.IsUnspecified():
		return VXLANDevice + " has a multicast group"
	}
	// The socket must be in the host (crypt) namespace: the device's link
	// namespace, as seen from the overlay namespace.
	id, err := s.ov.GetNetNsIdByFd(int(s.sockNS))
	if err != nil || id < 0 || vx.NetNsID != id {
		if cfg.Encrypted {
			return "the UDP socket of " + VXLANDevice + " is not in the crypt namespace"
		}
		return "the UDP socket of " + VXLANDevice + " is not in the host namespace"
	}
	return ""
}

// ensureGateways makes the bridge's global addresses exactly want.
func ensureGateways(ov *netlink.Handle, br netlink.Link, want []netip.Prefix) error {
	addrs, err := dump(func() ([]netlink.Addr, error) { return ov.AddrList(br, netlink.FAMILY_ALL) })
	if err != nil {
		return fmt.Errorf("list %s addresses: %w", BridgeDevice, err)
	}
	have := map[netip.Prefix]bool{}
	for _, a := range addrs {
		p, ok := addrPrefix(a)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if !slices.Contains(want, p) {
			if err := ov.AddrDel(br, &a); err != nil {
				return fmt.Errorf("remove %s from %s: %w", p, BridgeDevice, err)
			}
			continue
		}
		have[p] = true
	}
	for _, p := range want {
		if have[p] {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			// Every host has this address: duplicate detection would fail.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := ov.AddrAdd(br, a); err != nil {
			return fmt.Errorf("add gateway %s to %s: %w", p, BridgeDevice, err)
		}
	}
	return nil
}

func addrPrefix(a netlink.Addr) (netip.Prefix, bool) {
	if a.IPNet == nil {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(a.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := a.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

// randomMAC returns a random locally administered unicast MAC.
func randomMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	rand.Read(mac)
	mac[0] = mac[0]&0xfe | 0x02
	return mac
}
