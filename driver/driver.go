// Package driver is the libnetwork NetworkDriver: it gives Docker networks
// a cluster-wide identity (an overlay), records endpoints in the store, and
// keeps this host's data plane in step with the store.
package driver

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
)

// Overlay is what the data plane needs to build one overlay on this host.
type Overlay struct {
	Name     string
	VNI      uint32
	Encap    string
	Subnets  []netip.Prefix
	Gateways []netip.Addr // per subnet; invalid when none
	MTU      int          // 0: derive from the underlay
	// Encrypted: VXLAN between hosts is encrypted (the plane must be an
	// EncryptingPlane).
	Encrypted bool
}

// Endpoint is one container interface on an overlay.
type Endpoint struct {
	ID   string
	MAC  net.HardwareAddr
	IPv4 netip.Prefix
	IPv6 netip.Prefix // invalid when none
}

// Peer is an endpoint on another host.
type Peer struct {
	Host netip.Addr // the remote host's underlay address
	MAC  net.HardwareAddr
	IPs  []netip.Addr
}

// DataPlane programs this host's kernel. The driver tells it what should
// exist; every method is idempotent.
type DataPlane interface {
	// Check reports whether the kernel can build encap, with a clear error if not.
	Check(encap string) error
	// MaxMTU is the largest overlay MTU the underlay carries with encap,
	// encrypted or not: the underlay device's MTU minus the
	// encapsulation's (and encryption's) overhead (what an overlay without
	// an MTU of its own gets).
	MaxMTU(encap string, encrypted bool) (int, error)
	// EnsureOverlay builds (or finds and repairs) the overlay's bridge and tunnel.
	EnsureOverlay(ov Overlay) error
	// RemoveOverlay deletes everything the overlay has on this host.
	RemoveOverlay(vni uint32) error
	// Overlays lists the VNIs of the overlays present on this host.
	Overlays() ([]uint32, error)
	// AddEndpoint creates the endpoint's interface pair and returns the name
	// of the end libnetwork moves into the container.
	AddEndpoint(vni uint32, ep Endpoint) (string, error)
	// RemoveEndpoint deletes the endpoint's interfaces, if still there.
	RemoveEndpoint(vni uint32, epID string) error
	// HasEndpoint reports whether the endpoint's bridge port exists.
	HasEndpoint(vni uint32, epID string) (bool, error)
	// DisableEndpoint takes the endpoint's bridge port down (the container
	// keeps its interface, without carrier), if it exists.
	DisableEndpoint(vni uint32, epID string) error
	// SetPeers makes the overlay's static forwarding and neighbour entries
	// exactly peers, leaving correct entries untouched; it returns how many
	// entries it added or removed.
	SetPeers(vni uint32, peers []Peer) (int, error)
	// UpdatePeers applies a change to the overlay's remote endpoints and
	// hosts without reading the kernel's tables, so its cost does not
	// grow with the number of entries: first AddHosts become remote
	// hosts, then Remove's entries go, Add's are added (or replaced), and
	// last RemoveHosts stop being remote hosts. Add peers' hosts must be
	// remote hosts already (their peers programmed) or in AddHosts. For
	// an encrypted overlay SetPeers must have run once since the process
	// started. It returns how many entries it changed.
	UpdatePeers(vni uint32, d PeerDelta) (int, error)
}

// PeerDelta is a change to an overlay's remote endpoints and hosts
// (DataPlane.UpdatePeers).
type PeerDelta struct {
	Add, Remove           []Peer
	AddHosts, RemoveHosts []netip.Addr
}

// VerifyingPlane is a DataPlane that can also say how this host's kernel
// differs from what the driver wants, and remove what nobody wants: what
// doctor works with (the kernel plane is one).
type VerifyingPlane interface {
	DataPlane
	// Underlay names the device holding this host's underlay address and
	// gives its MTU.
	Underlay() (dev string, mtu int, err error)
	// Namespace is where the overlay's namespace is (or would be).
	Namespace(vni uint32) string
	// VerifyHost reports what in the host namespace keeps any of the
	// overlays from being built: another tool's VXLAN device holding its
	// VNI.
	VerifyHost(overlays []PlannedOverlay) ([]overlay.Problem, error)
	// VerifyOverlay compares the overlay's kernel objects with what
	// EnsureOverlay, AddEndpoint and SetPeers make of po; the ports of the
	// endpoints in ignore are left alone. An overlay without a namespace
	// here is overlay.ErrNotFound.
	VerifyOverlay(po PlannedOverlay, ignore []string) (*overlay.Diff, error)
	// RemoveDevice deletes a device VerifyOverlay found stray
	// (overlay.RepairRemove) from the overlay's namespace.
	RemoveDevice(vni uint32, name string) error
}

// Config is what the driver needs.
type Config struct {
	Store    store.Store
	Plane    DataPlane
	HostAddr netip.Addr // this host's underlay (advertise) address
	// MachineID identifies this machine (identity.go): stable across
	// restarts, different on every machine.
	MachineID string
	Scope     string // "local" (plain hosts) or "global" (swarm)
	LiveTTL   time.Duration
	// StaleAfter is how long a host may be gone before its records are
	// purged (stale.go); 0 means DefaultStaleAfter.
	StaleAfter time.Duration
	Log        *slog.Logger
	Metrics    Metrics     // optional; nil means none
	Names      NameService // optional; nil means no names across hosts
	// PublicKey is this host's public key for encrypted overlays, as
	// published in its host record; empty if it cannot encrypt.
	PublicKey string
	// HostLock, if set, is held (shared) while the driver builds or
	// changes this host's overlays, so that another process repairing
	// them (doctor --fix, which takes it exclusively) never removes what
	// is being built or used.
	HostLock func(ctx context.Context) (unlock func(), err error)
	// KeepLiveOnStop: when Start's ctx ends while this host still has
	// endpoints, leave its live key to lapse after LiveTTL instead of
	// deleting it, and report that with KeptLive. The data plane outlives
	// the plugin, so a plugin back within LiveTTL (docker plugin disable,
	// set, upgrade, enable) is never taken for a lost host, and the other
	// hosts keep forwarding to this host's containers meanwhile.
	KeepLiveOnStop bool
}

// Metrics is told what the driver's reconciliation of this host's kernel
// with the store does (package internal/metrics implements it).
type Metrics interface {
	// Reconciled reports one reconciliation run: how many kernel changes
	// it made and how it ended.
	Reconciled(changes int, err error)
	// Known reports the endpoints in the store, on this host and on
	// others, and the live hosts (this one included), as last seen.
	Known(localEndpoints, remoteEndpoints, hosts int)
	// Skipped reports the endpoint records the last reconciliation did
	// not program: malformed ones, and ones claiming a MAC or address
	// another endpoint of their overlay holds.
	Skipped(invalid, conflicting int)
}

// Driver is the NetworkDriver.
type Driver struct {
	cfg  Config
	host string
	log  *slog.Logger

	mu        sync.Mutex
	networks  map[string]*localNetwork // by Docker network id
	endpoints map[string]*localEndpoint

	// planeMu keeps Join's building of an overlay and its interface apart
	// from the peer sync's removal of overlays no local endpoint uses.
	planeMu sync.Mutex
	// keptLive: Start's ctx ended and the live key was left to lapse
	// (Config.KeepLiveOnStop).
	keptLive atomic.Bool

	peers *peerSync
	mcast *mcastSync
	keys  *keySync
	done  chan struct{}

	// mroutes: which endpoint holds the multicast route of a sandbox
	// (mcast.go), by sandbox key.
	mroutes map[string]string
	id      identity
}

type localNetwork struct {
	ID      string
	Rec     networkRecord
	Overlay overlayRecord
}

type localEndpoint struct {
	ID      string
	Network string
	Rec     endpointRecord
}

// New returns a driver; call Start before serving calls.
func New(cfg Config) *Driver {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Scope == "" {
		cfg.Scope = network.LocalScope
	}
	if cfg.LiveTTL == 0 {
		cfg.LiveTTL = 15 * time.Second
	}
	d := &Driver{
		cfg:       cfg,
		host:      cfg.HostAddr.String(),
		log:       cfg.Log,
		networks:  map[string]*localNetwork{},
		endpoints: map[string]*localEndpoint{},
	}
	d.peers = newPeerSync(d)
	d.mcast = newMcastSync(d)
	d.mroutes = map[string]string{}
	d.keys = newKeySync(d)
	d.done = make(chan struct{})
	return d
}

// Start loads this host's networks and endpoints from the store, registers
// the host, and keeps the data plane in step with the store until ctx ends.
// When the store is unreachable it keeps trying in the background: the
// plugin serves what it can and converges once the store is back.
func (d *Driver) Start(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { d.peers.run(ctx) })
	wg.Go(func() { d.mcast.run(ctx) })
	wg.Go(func() { d.keys.run(ctx) })
	go func() { wg.Wait(); close(d.done) }()
}

// Done is closed once the driver stopped after Start's ctx ended.
func (d *Driver) Done() <-chan struct{} { return d.done }

// KeptLive reports, once Done is closed, whether the driver left this
// host's live key in the store to lapse by itself (Config.KeepLiveOnStop).
// The store must then not be closed: closing it deletes the key. Exit the
// process instead, as a crash would.
func (d *Driver) KeptLive() bool { return d.keptLive.Load() }

// GetCapabilities: local scope on plain hosts, global in swarm; the
// overlay connects hosts, so connectivity is always global.
func (d *Driver) GetCapabilities(ctx context.Context) (*network.CapabilitiesResponse, error) {
	return &network.CapabilitiesResponse{Scope: d.cfg.Scope, ConnectivityScope: network.GlobalScope}, nil
}

// CreateNetwork joins (or creates) the overlay the network names.
func (d *Driver) CreateNetwork(ctx context.Context, r *network.CreateNetworkRequest) error {
	if r.NetworkID == "" {
		return errors.New("CreateNetwork without a NetworkID")
	}
	if err := validID("network", r.NetworkID); err != nil {
		return err
	}
	d.log.Debug("create network request", "network", short(r.NetworkID), "ipv4", ipamDataString(r.IPv4Data), "ipv6", ipamDataString(r.IPv6Data), "options", r.Options)
	spec, err := parseCreate(r)
	if err != nil {
		return err
	}
	space := ipamSpace(r)
	switch {
	case d.cfg.Scope == network.GlobalScope:
		// Only swarm networks exist with a driver of global scope; their
		// Docker ID is the same on every node, and the swarm manager
		// allocates every address of the network, whatever its IPAM driver.
		spec.Swarm = r.NetworkID
		if len(spec.Ranges) > 0 {
			return errSwarmRange
		}
	case !ownIPAM(space) && len(spec.Ranges) == 0:
		return errForeignIPAM(space)
	case ownIPAM(space) && len(spec.Ranges) > 0:
		return fmt.Errorf("option %s is for networks whose addresses come from another IPAM driver; this one uses the plugin's, which never gives one address twice: drop the option", OptIPAMRange)
	case !ownIPAM(space):
		spec.Uncoordinated = true
	}
	if err := d.cfg.Plane.Check(spec.Encap); err != nil {
		return err
	}
	if spec.Encrypted {
		if err := d.checkEncryption(); err != nil {
			return err
		}
	}
	maxMTU, err := d.cfg.Plane.MaxMTU(spec.Encap, spec.Encrypted)
	if err != nil {
		return fmt.Errorf("network %.12s: %w", r.NetworkID, err)
	}
	if spec.MTU > maxMTU {
		return fmt.Errorf("option mtu=%d: this host's underlay carries at most %d with %s (the underlay device's MTU minus the %s overhead)", spec.MTU, maxMTU, spec.Encap, spec.Encap)
	}
	ov, err := joinOverlay(ctx, d.cfg.Store, spec, joining{Host: d.host, Network: r.NetworkID, MaxMTU: maxMTU})
	if err != nil {
		return err
	}
	rec := networkRecord{Overlay: ov.Name, Internal: spec.Internal, MTU: spec.MTU, IPAMRanges: subnetStrings(spec.Ranges)}
	if len(rec.IPAMRanges) == 0 {
		rec.IPAMRanges = nil
	}
	if _, err := d.cfg.Store.Put(ctx, netmapKey(d.host, r.NetworkID), encode(rec)); err != nil {
		leaveOverlayNetwork(ctx, d.cfg.Store, ov.Name, d.host, r.NetworkID)
		return fmt.Errorf("record network %.12s: %w", r.NetworkID, err)
	}
	d.mu.Lock()
	d.networks[r.NetworkID] = &localNetwork{ID: r.NetworkID, Rec: rec, Overlay: ov}
	d.mu.Unlock()
	d.log.Info("network created", "network", short(r.NetworkID), "overlay", ov.Name, "vni", ov.VNI, "subnets", ov.Subnets, "encrypted", ov.Encrypted)
	return nil
}

// DeleteNetwork forgets the network here and leaves its overlay.
func (d *Driver) DeleteNetwork(ctx context.Context, r *network.DeleteNetworkRequest) error {
	n, err := d.network(ctx, r.NetworkID)
	if errors.Is(err, errNoOverlay) {
		// Its overlay went from under it (an earlier version freed it
		// with another network of this host): nothing left to leave.
		if err := d.cfg.Store.Delete(ctx, netmapKey(d.host, r.NetworkID)); err != nil {
			return fmt.Errorf("delete network %.12s: %w", r.NetworkID, err)
		}
		d.log.Warn("network deleted; its overlay record was gone already", "network", short(r.NetworkID))
		return nil
	}
	if err != nil {
		return err
	}
	// Leave first: should the netmap delete fail, Docker's retry finds the
	// network again, and leaving twice is harmless.
	if err := leaveOverlayNetwork(ctx, d.cfg.Store, n.Overlay.Name, d.host, n.ID); err != nil {
		return fmt.Errorf("delete network %.12s: leave overlay %s: %w", n.ID, n.Overlay.Name, err)
	}
	if err := d.cfg.Store.Delete(ctx, netmapKey(d.host, n.ID)); err != nil {
		return fmt.Errorf("delete network %.12s: %w", n.ID, err)
	}
	d.mu.Lock()
	delete(d.networks, n.ID)
	d.mu.Unlock()
	d.peers.kick()
	d.log.Info("network deleted", "network", short(n.ID), "overlay", n.Overlay.Name)
	return nil
}

// network finds a network of this host, in memory or (after a restart) in the store.
func (d *Driver) network(ctx context.Context, id string) (*localNetwork, error) {
	d.mu.Lock()
	n := d.networks[id]
	d.mu.Unlock()
	if n != nil {
		return n, nil
	}
	if id == "" {
		return nil, errors.New("no NetworkID given")
	}
	if err := validID("network", id); err != nil {
		return nil, err
	}
	kv, err := d.cfg.Store.Get(ctx, netmapKey(d.host, id))
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("network %.12s is not a network of this plugin on this host", id)
	}
	if err != nil {
		return nil, fmt.Errorf("network %.12s: %w", id, err)
	}
	rec, err := decodeKV[networkRecord](kv)
	if err != nil {
		return nil, err
	}
	okv, err := d.cfg.Store.Get(ctx, overlayKey(rec.Overlay))
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("network %.12s: overlay %s: %w", id, rec.Overlay, errNoOverlay)
	}
	if err != nil {
		return nil, fmt.Errorf("network %.12s: overlay %s: %w", id, rec.Overlay, err)
	}
	ov, err := decodeKV[overlayRecord](okv)
	if err != nil {
		return nil, err
	}
	n = &localNetwork{ID: id, Rec: rec, Overlay: ov}
	d.mu.Lock()
	d.networks[id] = n
	d.mu.Unlock()
	return n, nil
}

// CreateEndpoint records the endpoint (address from IPAM, MAC chosen here
// when Docker gave none) so every host can program its peers.
func (d *Driver) CreateEndpoint(ctx context.Context, r *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error) {
	n, err := d.network(ctx, r.NetworkID)
	if err != nil {
		return nil, err
	}
	if err := validID("endpoint", r.EndpointID); err != nil {
		return nil, err
	}
	if r.Interface == nil || r.Interface.Address == "" {
		return nil, fmt.Errorf("endpoint %.12s: Docker gave no IPv4 address (use --ipam-driver with this plugin)", r.EndpointID)
	}
	rec := endpointRecord{Network: n.ID, Host: d.host}
	ip4, err := endpointAddr(n, r.Interface.Address, false)
	if err != nil {
		return nil, fmt.Errorf("endpoint %.12s: %w", r.EndpointID, err)
	}
	rec.IPv4 = ip4.String()
	if r.Interface.AddressIPv6 != "" {
		ip6, err := endpointAddr(n, r.Interface.AddressIPv6, true)
		if err != nil {
			return nil, fmt.Errorf("endpoint %.12s: %w", r.EndpointID, err)
		}
		rec.IPv6 = ip6.String()
	}
	if err := d.inRanges(ctx, n, rec); err != nil {
		return nil, fmt.Errorf("endpoint %.12s: %w", r.EndpointID, err)
	}
	resp := &network.CreateEndpointResponse{}
	if r.Interface.MacAddress != "" {
		mac, err := unicastMAC(r.Interface.MacAddress)
		if err != nil {
			return nil, fmt.Errorf("endpoint %.12s: %w", r.EndpointID, err)
		}
		rec.MAC = mac.String()
	} else {
		rec.MAC = newMAC().String()
		resp.Interface = &network.EndpointInterface{MacAddress: rec.MAC}
	}
	if err := createEndpoint(ctx, d.cfg.Store, n.Overlay.Name, r.EndpointID, rec); err != nil {
		return nil, fmt.Errorf("endpoint %.12s: %w", r.EndpointID, err)
	}
	d.mu.Lock()
	d.endpoints[r.EndpointID] = &localEndpoint{ID: r.EndpointID, Network: n.ID, Rec: rec}
	d.mu.Unlock()
	d.log.Info("endpoint created", "network", short(n.ID), "endpoint", short(r.EndpointID), "ip", rec.IPv4, "mac", rec.MAC)
	return resp, nil
}

// newMAC returns a random locally administered unicast MAC.
func newMAC() net.HardwareAddr {
	mac := make(net.HardwareAddr, 6)
	rand.Read(mac)
	mac[0] = (mac[0] | 0x02) &^ 0x01
	return mac
}

func (d *Driver) endpoint(ctx context.Context, netID, epID string) (*localNetwork, *localEndpoint, error) {
	n, err := d.network(ctx, netID)
	if err != nil {
		return nil, nil, err
	}
	d.mu.Lock()
	ep := d.endpoints[epID]
	d.mu.Unlock()
	if ep != nil {
		return n, ep, nil
	}
	if epID == "" {
		return nil, nil, errors.New("no EndpointID given")
	}
	if err := validID("endpoint", epID); err != nil {
		return nil, nil, err
	}
	kv, err := d.cfg.Store.Get(ctx, endpointKey(n.Overlay.Name, epID))
	if errors.Is(err, store.ErrNotFound) {
		return n, nil, fmt.Errorf("endpoint %.12s on network %.12s: %w", epID, netID, errNoEndpoint)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("endpoint %.12s: %w", epID, err)
	}
	rec, err := decodeKV[endpointRecord](kv)
	if err != nil {
		return nil, nil, err
	}
	ep = &localEndpoint{ID: epID, Network: netID, Rec: rec}
	d.mu.Lock()
	d.endpoints[epID] = ep
	d.mu.Unlock()
	return n, ep, nil
}

// overlayOf builds the data plane's view of a network.
func overlayOf(n *localNetwork) Overlay {
	ov := overlayOfRecord(n.Overlay)
	if n.Rec.MTU != 0 {
		ov.MTU = n.Rec.MTU
	}
	return ov
}

// overlayOfRecord is the data plane's view of an overlay's record.
func overlayOfRecord(rec overlayRecord) Overlay {
	ov := Overlay{Name: rec.Name, VNI: rec.VNI, Encap: rec.Encap, MTU: rec.MTU, Encrypted: rec.Encrypted}
	for i, s := range rec.Subnets {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			continue
		}
		var gw netip.Addr
		if i < len(rec.Gateways) {
			gw, _ = netip.ParseAddr(rec.Gateways[i])
		}
		ov.Subnets = append(ov.Subnets, p)
		ov.Gateways = append(ov.Gateways, gw)
	}
	return ov
}

// Join builds the overlay here if needed and hands libnetwork the
// container end of a veth pair. No gateway is returned: libnetwork then
// gives the container its way out through docker_gwbridge (with NAT and
// port publishing by Docker), and none at all on --internal networks.
func (d *Driver) Join(ctx context.Context, r *network.JoinRequest) (*network.JoinResponse, error) {
	n, ep, err := d.endpoint(ctx, r.NetworkID, r.EndpointID)
	if err != nil {
		return nil, err
	}
	dpEP, err := dataEndpoint(ep)
	if err != nil {
		return nil, err
	}
	d.planeMu.Lock()
	defer d.planeMu.Unlock()
	unlock, err := d.lockHost(ctx)
	if err != nil {
		return nil, fmt.Errorf("join %.12s: %w", ep.ID, err)
	}
	defer unlock()
	if err := d.ensureOverlay(overlayOf(n)); err != nil {
		return nil, fmt.Errorf("join %.12s: build overlay %s: %w", ep.ID, n.Overlay.Name, err)
	}
	ifName, err := d.cfg.Plane.AddEndpoint(n.Overlay.VNI, dpEP)
	if err != nil {
		return nil, fmt.Errorf("join %.12s: %w", ep.ID, err)
	}
	d.peers.nudge()
	resp := &network.JoinResponse{InterfaceName: network.InterfaceName{SrcName: ifName, DstPrefix: "eth"}}
	if d.cfg.Names != nil {
		resp.StaticRoutes = d.cfg.Names.Join(overlayOf(n), ep.ID, r.SandboxKey)
	}
	d.log.Info("endpoint joined", "network", short(n.ID), "endpoint", short(ep.ID), "interface", ifName)
	if d.takeMulticastRoute(r.SandboxKey, ep.ID) {
		resp.StaticRoutes = append(resp.StaticRoutes, multicastRoute())
	}
	return resp, nil
}

func dataEndpoint(ep *localEndpoint) (Endpoint, error) {
	mac, err := net.ParseMAC(ep.Rec.MAC)
	if err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %.12s: stored mac %q: %v", ep.ID, ep.Rec.MAC, err)
	}
	out := Endpoint{ID: ep.ID, MAC: mac}
	if out.IPv4, err = netip.ParsePrefix(ep.Rec.IPv4); err != nil {
		return Endpoint{}, fmt.Errorf("endpoint %.12s: stored address %q: %v", ep.ID, ep.Rec.IPv4, err)
	}
	if ep.Rec.IPv6 != "" {
		if out.IPv6, err = netip.ParsePrefix(ep.Rec.IPv6); err != nil {
			return Endpoint{}, fmt.Errorf("endpoint %.12s: stored address %q: %v", ep.ID, ep.Rec.IPv6, err)
		}
	}
	return out, nil
}

// errNoOverlay: a network's overlay record is gone from the store.
var errNoOverlay = errors.New("the overlay record is gone from the store (removed while this network still used it, by an earlier version); remove the network and create it again")

// errNoEndpoint: the store has no record of the endpoint.
var errNoEndpoint = errors.New("endpoint does not exist")

// Leave removes the endpoint's interfaces; the record stays until DeleteEndpoint.
func (d *Driver) Leave(ctx context.Context, r *network.LeaveRequest) error {
	if d.cfg.Names != nil {
		d.cfg.Names.Leave(r.EndpointID)
	}
	n, ep, err := d.endpoint(ctx, r.NetworkID, r.EndpointID)
	if errors.Is(err, errNoEndpoint) {
		return d.forgetEndpoint(ctx, n, r.EndpointID, "leave")
	}
	if err != nil {
		return err
	}
	if err := d.cfg.Plane.RemoveEndpoint(n.Overlay.VNI, ep.ID); err != nil {
		return fmt.Errorf("leave %.12s: %w", ep.ID, err)
	}
	d.dropMulticastRoute(ep.ID)
	d.log.Info("endpoint left", "network", short(n.ID), "endpoint", short(ep.ID))
	return nil
}

// DeleteEndpoint removes the endpoint's record; the overlay's bridge and
// tunnel go with the last local endpoint (the peer sync does that).
func (d *Driver) DeleteEndpoint(ctx context.Context, r *network.DeleteEndpointRequest) error {
	if d.cfg.Names != nil {
		d.cfg.Names.Leave(r.EndpointID)
	}
	n, ep, err := d.endpoint(ctx, r.NetworkID, r.EndpointID)
	if errors.Is(err, errNoEndpoint) {
		return d.forgetEndpoint(ctx, n, r.EndpointID, "delete")
	}
	if err != nil {
		return err
	}
	if err := d.cfg.Plane.RemoveEndpoint(n.Overlay.VNI, ep.ID); err != nil {
		return fmt.Errorf("delete endpoint %.12s: %w", ep.ID, err)
	}
	// Forgotten first: the peer sync then knows the record's deletion for
	// this host's own, not another host's orphaning of a live endpoint.
	d.mu.Lock()
	delete(d.endpoints, ep.ID)
	d.mu.Unlock()
	if err := deleteEndpoint(ctx, d.cfg.Store, n.Overlay.Name, ep.ID); err != nil {
		return fmt.Errorf("delete endpoint %.12s: %w", ep.ID, err)
	}
	d.dropMulticastRoute(ep.ID)
	d.peers.nudge()
	d.log.Info("endpoint deleted", "network", short(n.ID), "endpoint", short(ep.ID))
	return nil
}

// forgetEndpoint ends an endpoint the store no longer knows (its host was
// lost and another host released it): its interfaces and any orphan record
// go, and Docker's cleanup goes on.
func (d *Driver) forgetEndpoint(ctx context.Context, n *localNetwork, id, op string) error {
	if err := d.cfg.Plane.RemoveEndpoint(n.Overlay.VNI, id); err != nil {
		return fmt.Errorf("%s %.12s: %w", op, id, err)
	}
	d.dropMulticastRoute(id)
	if op == "delete" {
		if err := d.cfg.Store.Delete(ctx, orphanKey(d.host, id)); err != nil {
			return fmt.Errorf("%s %.12s: %w", op, id, err)
		}
		d.peers.kick()
	}
	d.log.Info(op+": endpoint unknown to the store (released after a host loss?); done", "network", short(n.ID), "endpoint", short(id))
	return nil
}

// EndpointInfo reports what operators may want to see in docker inspect.
func (d *Driver) EndpointInfo(ctx context.Context, r *network.InfoRequest) (*network.InfoResponse, error) {
	n, ep, err := d.endpoint(ctx, r.NetworkID, r.EndpointID)
	if err != nil {
		return nil, err
	}
	return &network.InfoResponse{Value: map[string]string{
		"overlay": n.Overlay.Name,
		"vni":     fmt.Sprint(n.Overlay.VNI),
		"host":    ep.Rec.Host,
		"mac":     ep.Rec.MAC,
	}}, nil
}

// DiscoverNew: peers are found through the store, not through Docker.
func (d *Driver) DiscoverNew(ctx context.Context, r *network.DiscoveryNotification) error { return nil }

// DiscoverDelete: see DiscoverNew.
func (d *Driver) DiscoverDelete(ctx context.Context, r *network.DiscoveryNotification) error {
	return nil
}

// ProgramExternalConnectivity: egress and published ports go through
// docker_gwbridge, which Docker itself programs.
func (d *Driver) ProgramExternalConnectivity(ctx context.Context, r *network.ProgramExternalConnectivityRequest) error {
	return nil
}

// RevokeExternalConnectivity: see ProgramExternalConnectivity.
func (d *Driver) RevokeExternalConnectivity(ctx context.Context, r *network.RevokeExternalConnectivityRequest) error {
	return nil
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

// ipamDataString shows the IPAM data of a request in a log line.
func ipamDataString(data []*network.IPAMData) string {
	var parts []string
	for _, x := range data {
		if x != nil {
			parts = append(parts, fmt.Sprintf("space=%s pool=%s gateway=%s aux=%v", x.AddressSpace, x.Pool, x.Gateway, x.AuxAddresses))
		}
	}
	return strings.Join(parts, "; ")
}
