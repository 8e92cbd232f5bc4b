package driver

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/dnplabs/docker-net-plugin/overlay"
)

// kernelPlane is the DataPlane of the real kernel (package overlay). Each
// overlay's namespace is named after its VNI, so a restarted plugin finds
// what it built before.
type kernelPlane struct {
	host  *overlay.Host
	local netip.Addr
}

// NewKernelPlane programs this host's kernel; local is the underlay address
// VXLAN tunnels start from. The overlay namespaces are bound in dir
// (default /run/netns) as <prefix><vni> (default prefix "dnp-").
func NewKernelPlane(local netip.Addr, dir, prefix string) DataPlane {
	return &kernelPlane{host: &overlay.Host{Dir: dir, Prefix: prefix}, local: local}
}

// NewEncryptingKernelPlane is NewKernelPlane that can also build encrypted
// overlays, running their data path as enc says. It is an EncryptingPlane.
func NewEncryptingKernelPlane(local netip.Addr, dir, prefix string, enc *overlay.Encryption) DataPlane {
	return &kernelPlane{host: &overlay.Host{Dir: dir, Prefix: prefix, Encryption: enc}, local: local}
}

func (k *kernelPlane) CheckEncryption() error {
	if k.host.Encryption == nil {
		return overlay.ErrNoEncryption
	}
	if !k.local.Is4() {
		return fmt.Errorf("option encrypted: needs an IPv4 underlay (this host's address is %s)", k.local)
	}
	return overlay.EncryptionAvailable()
}

func (k *kernelPlane) ResumeEncryption() error {
	if k.host.Encryption == nil || !k.local.Is4() {
		return nil
	}
	return k.host.StartEncryption(k.local)
}

func (k *kernelPlane) SetHostKeys(keys map[netip.Addr]string) error {
	if k.host.Encryption == nil {
		return nil
	}
	return k.host.SetHostKeys(keys)
}

func nsID(vni uint32) string { return strconv.FormatUint(uint64(vni), 10) }

func (k *kernelPlane) Check(encap string) error { return overlay.Available(encap) }

func (k *kernelPlane) MaxMTU(encap string, encrypted bool) (int, error) {
	return k.host.MaxMTU(k.local, encap, encrypted)
}

// config is what the overlay is to package overlay.
func (k *kernelPlane) config(ov Overlay) overlay.NetworkConfig {
	cfg := overlay.NetworkConfig{ID: nsID(ov.VNI), VNI: ov.VNI, Encap: ov.Encap, LocalIP: k.local, MTU: ov.MTU, Encrypted: ov.Encrypted}
	for i, gw := range ov.Gateways {
		if gw.IsValid() && i < len(ov.Subnets) {
			cfg.Gateways = append(cfg.Gateways, netip.PrefixFrom(gw, ov.Subnets[i].Bits()))
		}
	}
	return cfg
}

func (k *kernelPlane) EnsureOverlay(ov Overlay) error {
	_, err := k.host.EnsureNetwork(k.config(ov))
	return err
}

func (k *kernelPlane) RemoveOverlay(vni uint32) error { return k.host.DeleteNetwork(nsID(vni)) }

func (k *kernelPlane) Overlays() ([]uint32, error) {
	ids, err := k.host.ListNetworks()
	if err != nil {
		return nil, err
	}
	var out []uint32
	for _, id := range ids {
		if v, err := strconv.ParseUint(id, 10, 32); err == nil {
			out = append(out, uint32(v))
		}
	}
	return out, nil
}

func (k *kernelPlane) AddEndpoint(vni uint32, ep Endpoint) (string, error) {
	n, err := k.host.Network(nsID(vni))
	if err != nil {
		return "", fmt.Errorf("overlay vni %d: %w", vni, err)
	}
	return n.AddEndpoint(overlay.Endpoint{ID: ep.ID, MAC: ep.MAC})
}

func (k *kernelPlane) RemoveEndpoint(vni uint32, epID string) error {
	n, err := k.host.Network(nsID(vni))
	if errors.Is(err, overlay.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return n.RemoveEndpoint(epID)
}

func (k *kernelPlane) HasEndpoint(vni uint32, epID string) (bool, error) {
	n, err := k.host.Network(nsID(vni))
	if errors.Is(err, overlay.ErrNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	st, err := n.State()
	if err != nil {
		return false, err
	}
	for _, l := range st.Links {
		if l.Alias == epID {
			return true, nil
		}
	}
	return false, nil
}

func (k *kernelPlane) SetPeers(vni uint32, peers []Peer) (int, error) {
	n, err := k.host.Network(nsID(vni))
	if err != nil {
		return 0, fmt.Errorf("overlay vni %d: %w", vni, err)
	}
	return n.SetPeers(overlayPeers(peers), nil)
}

func (k *kernelPlane) UpdatePeers(vni uint32, d PeerDelta) (int, error) {
	n, err := k.host.Network(nsID(vni))
	if err != nil {
		return 0, fmt.Errorf("overlay vni %d: %w", vni, err)
	}
	return n.UpdatePeers(overlay.Delta{
		Add: overlayPeers(d.Add), Remove: overlayPeers(d.Remove),
		AddHosts: d.AddHosts, RemoveHosts: d.RemoveHosts,
	})
}

func overlayPeers(peers []Peer) []overlay.Peer {
	ps := make([]overlay.Peer, len(peers))
	for i, p := range peers {
		ps[i] = overlay.Peer{HostIP: p.Host, MAC: p.MAC, IPs: p.IPs}
	}
	return ps
}

var _ VerifyingPlane = (*kernelPlane)(nil)

func (k *kernelPlane) Underlay() (string, int, error) { return k.host.Underlay(k.local) }

func (k *kernelPlane) Namespace(vni uint32) string { return k.host.NamespacePath(nsID(vni)) }

func (k *kernelPlane) VerifyHost(overlays []PlannedOverlay) ([]overlay.Problem, error) {
	inUse, err := k.host.VXLANInUse()
	if err != nil {
		return nil, err
	}
	var out []overlay.Problem
	for _, ov := range overlays {
		if dev, ok := inUse[ov.VNI]; ok {
			out = append(out, overlay.Problem{
				Kind: overlay.Extra, Device: dev,
				What: fmt.Sprintf("host device %s is a VXLAN device with VNI %d on port %d, which overlay %s needs", dev, ov.VNI, overlay.VXLANPort, ov.Name),
			})
		}
	}
	return out, nil
}

func (k *kernelPlane) VerifyOverlay(po PlannedOverlay, ignore []string) (*overlay.Diff, error) {
	want := overlay.Want{NetworkConfig: k.config(po.Overlay), Peers: overlayPeers(po.Peers), Ignore: ignore}
	for _, ep := range po.Endpoints {
		want.Endpoints = append(want.Endpoints, ep.ID)
	}
	return k.host.VerifyNetwork(want)
}

func (k *kernelPlane) RemoveDevice(vni uint32, name string) error {
	return k.host.RemoveDevice(nsID(vni), name)
}

func (k *kernelPlane) Groups(vni uint32) ([]netip.Addr, error) {
	n, err := k.host.Network(nsID(vni))
	if errors.Is(err, overlay.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return n.Groups()
}

func (k *kernelPlane) SetGroups(vni uint32, remote map[netip.Addr][]netip.Addr) (int, error) {
	n, err := k.host.Network(nsID(vni))
	if errors.Is(err, overlay.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	return n.SetGroups(remote)
}

func (k *kernelPlane) DisableEndpoint(vni uint32, epID string) error {
	n, err := k.host.Network(nsID(vni))
	if errors.Is(err, overlay.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	return n.DisableEndpoint(epID)
}
