// Package overlay programs the kernel data plane of multi-host overlay
// networks. It keeps no state of its own: a caller (the network driver)
// says what should exist and this package makes the kernel match, finding
// what a previous run left behind by deterministic names.
//
// Each overlay network gets its own network namespace, /run/netns/<prefix><id>,
// holding a Linux bridge (br0) and the tunnel ports that carry its frames
// between hosts. Networks are isolated from each other because they share
// no namespace; this package installs no iptables rules.
//
// Encap "vxlan" (the default): one VXLAN device (vxlan0), created from the
// host namespace, so its UDP socket (port 4789) lives there and uses the
// host's underlay, and placed in the overlay namespace as a bridge port.
// Nothing is learned: remote endpoints are static FDB entries on the VXLAN
// device (MAC -> remote host) plus static neighbour entries (IP -> MAC) on
// the bridge, and every remote host gets an all-zero FDB entry so broadcasts
// (ARP, ND) are replicated to it by unicast. ARP/ND suppression on the VXLAN
// port answers requests for known remote addresses locally. The VXLAN
// device joins no underlay multicast group: overlay multicast is
// replicated by unicast too, each group only to the hosts that want it
// (multicast.go).
//
// Encap "gre": one point-to-point gretap device per remote host (local =
// this host, remote = that host, GRE key = VNI both ways), named "gre" plus
// 8 hex digits of a hash of the remote address. Each is created in the host
// namespace, so its packets use the underlay, then moved into the overlay
// namespace (the kernel keeps a moved tunnel's outer side where it was
// made) as a bridge port with learning off, ARP/ND suppression on and
// isolation on: frames from one tunnel never leave by another (split
// horizon), so the full mesh of tunnels has no loops and needs no STP.
// Broadcasts reach every remote host because the bridge floods them to
// every tunnel port. Remote endpoints are static bridge FDB entries (MAC
// -> that host's tunnel port) plus the same neighbour entries as for
// VXLAN. The bridge's alias records the encap, VNI and local address, so a
// restarted process finds a GRE network that has no tunnel yet.
//
// An endpoint is a veth pair: one end is a port of the bridge inside the
// overlay namespace, the other stays in the host namespace with a
// deterministic name for libnetwork to move into the container.
package overlay

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	// DefaultPrefix starts the names of overlay namespaces when Host.Prefix is empty.
	DefaultPrefix = "dnp-"
	// VXLANPort is the UDP port of VXLAN (IANA; Linux would default to 8472).
	VXLANPort = 4789

	// Encapsulations known to NetworkConfig.Encap.
	EncapVXLAN = "vxlan"
	EncapGRE   = "gre"

	// BridgeDevice is every overlay namespace's bridge, VXLANDevice its
	// VXLAN device (VXLAN overlays only): the names other packages look
	// them up by.
	BridgeDevice = "br0"
	VXLANDevice  = "vxlan0"
	// greTunnelPrefix starts the names of GRE tunnel ports (plus 8 hex
	// digits); greTempPrefix the names they have while being created.
	greTunnelPrefix = "gre"
	greTempPrefix   = "dnpgre"

	// opTimeout bounds every netlink request and namespace operation.
	opTimeout = 10 * time.Second
)

var (
	// ErrNotFound is returned for an overlay network that has no namespace on this host.
	ErrNotFound = errors.New("overlay network not found")
	// ErrNoGRETap is returned for encap gre when the kernel cannot make gretap devices.
	ErrNoGRETap = errors.New("kernel has no GRE tap support (gretap); use encap=vxlan")
)

// Host programs the overlay networks of one host. The zero value works on
// the namespace of the calling process with DefaultPrefix. A Host serializes
// its own operations; it is safe for concurrent use.
type Host struct {
	// NetNS is the path of the host network namespace (for example
	// /run/netns/h1): where VXLAN sockets bind to the underlay and where
	// the host ends of endpoint veths appear. Empty means the caller's.
	NetNS string
	// Dir holds the files the overlay namespaces are bound to; empty means
	// DefaultDir (/run/netns). A managed plugin points it at its
	// propagated mount so the namespaces outlive a plugin restart.
	Dir string
	// Prefix starts the names of the overlay namespaces in Dir.
	// Two Hosts on one machine (tests, several dockerds) need different
	// prefixes, neither of which starts with the other.
	Prefix string
	// Encryption runs the data path of encrypted networks; nil: this
	// Host cannot make encrypted networks.
	Encryption *Encryption

	mu sync.Mutex

	kmu sync.Mutex // guards kp
	kp  *keeper

	nftWarn sync.Once // the log's one warning about a kernel without nftables
}

func (h *Host) prefix() string {
	if h.Prefix == "" {
		return DefaultPrefix
	}
	return h.Prefix
}

func (h *Host) dir() string {
	if h.Dir == "" {
		return DefaultDir
	}
	return h.Dir
}

func (h *Host) nsPath(id string) string { return filepath.Join(h.dir(), h.prefix()+id) }

// NamespacePath is where network id's namespace is (or would be) bound.
func (h *Host) NamespacePath(id string) string { return h.nsPath(id) }

// handles are the netlink handles one operation works with.
type handles struct {
	hostNS netns.NsHandle
	host   *netlink.Handle
	ovNS   netns.NsHandle
	ov     *netlink.Handle
	// Where a VXLAN network's socket is: the host namespace, or for an
	// encrypted network the crypt namespace (cryptNS, crypt).
	sockNS  netns.NsHandle
	sock    *netlink.Handle
	cryptNS netns.NsHandle
	crypt   *netlink.Handle
}

func (s *handles) close() {
	if s.crypt != nil {
		s.crypt.Close()
	}
	if s.cryptNS.IsOpen() {
		s.cryptNS.Close()
	}
	if s.ov != nil {
		s.ov.Close()
	}
	if s.ovNS.IsOpen() {
		s.ovNS.Close()
	}
	if s.host != nil {
		s.host.Close()
	}
	if s.hostNS.IsOpen() {
		s.hostNS.Close()
	}
}

// openHost returns handles with only the host namespace opened.
func (h *Host) openHost() (*handles, error) {
	if err := validName("prefix", h.prefix()); err != nil {
		return nil, err
	}
	s := &handles{hostNS: netns.None(), ovNS: netns.None(), sockNS: netns.None(), cryptNS: netns.None()}
	var err error
	if h.NetNS == "" {
		s.hostNS, err = netns.Get()
	} else {
		s.hostNS, err = netns.GetFromPath(h.NetNS)
	}
	if err != nil {
		return nil, fmt.Errorf("open host namespace %q: %w", h.NetNS, err)
	}
	if s.host, err = newHandle(s.hostNS); err != nil {
		s.close()
		return nil, fmt.Errorf("host namespace %q: %w", h.NetNS, err)
	}
	return s, nil
}

// openOverlay adds the overlay namespace ns to s, which then owns it.
func (s *handles) openOverlay(ns netns.NsHandle) error {
	s.ovNS = ns
	ov, err := newHandle(ns)
	if err != nil {
		return err
	}
	s.ov = ov
	return nil
}

// open returns handles for the host and the existing overlay namespace of
// network id (ErrNotFound if there is none).
func (h *Host) open(id string) (*handles, error) {
	if err := validName("network id", id); err != nil {
		return nil, err
	}
	s, err := h.openHost()
	if err != nil {
		return nil, err
	}
	ns, err := openNamedNS(h.nsPath(id))
	if err != nil {
		s.close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("network %s: %w", id, ErrNotFound)
		}
		return nil, err
	}
	if err := s.openOverlay(ns); err != nil {
		s.close()
		return nil, fmt.Errorf("network %s: %w", id, err)
	}
	return s, nil
}

func newHandle(ns netns.NsHandle) (*netlink.Handle, error) {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink handle: %w", err)
	}
	if err := h.SetSocketTimeout(opTimeout); err != nil {
		h.Close()
		return nil, fmt.Errorf("netlink socket timeout: %w", err)
	}
	return h, nil
}

var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// validName accepts ids that are safe in file and interface names.
func validName(what, s string) error {
	if len(s) > 128 || !namePattern.MatchString(s) {
		return fmt.Errorf("invalid %s %q: want 1-128 of [A-Za-z0-9_.-], starting with a letter or digit", what, s)
	}
	return nil
}

// vxlanOverhead is what VXLAN encapsulation adds to a frame on the underlay.
func vxlanOverhead(local netip.Addr) int {
	if local.Is4() {
		return 50 // outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
	}
	return 70 // outer IPv6 header is 40
}

// greOverhead is what GRE-tap encapsulation with a key adds to a frame on
// an IPv4 underlay: outer IPv4 header 20 + GRE header 4 + GRE key 4 +
// inner Ethernet header 14 = 42. (The 38 often quoted for gretap is
// without a key; the kernel's own default MTU for a keyed gretap on a 1500
// underlay is 1458, the same arithmetic.) GRE checksums and sequence
// numbers, 4 more each, are not used.
const greOverhead = 42

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// dump retries a netlink dump the kernel interrupted because the table
// changed meanwhile.
func dump[T any](f func() (T, error)) (T, error) { return sysutil.RetryDump(5, f) }
