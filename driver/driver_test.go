package driver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/bolt"
)

// fakePlane records what the driver asks of the kernel.
type fakePlane struct {
	mu       sync.Mutex
	overlays map[uint32]Overlay
	eps      map[string]uint32
	peers    map[uint32][]Peer
	noGRE    bool
	disabled map[string]bool
}

func newFakePlane() *fakePlane {
	return &fakePlane{overlays: map[uint32]Overlay{}, eps: map[string]uint32{}, peers: map[uint32][]Peer{}, noGRE: true}
}

func (f *fakePlane) Check(encap string) error {
	if encap == "gre" && f.noGRE {
		return fmt.Errorf("kernel has no gretap: use encap=vxlan")
	}
	return nil
}

// MaxMTU: a 1500-byte underlay minus 50 for VXLAN (42 for GRE), minus 40
// more when encrypted.
func (f *fakePlane) MaxMTU(encap string, encrypted bool) (int, error) {
	mtu := 1450
	if encap == "gre" {
		mtu = 1458
	}
	if encrypted {
		mtu -= 40
	}
	return mtu, nil
}
func (f *fakePlane) EnsureOverlay(ov Overlay) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.overlays[ov.VNI] = ov
	return nil
}
func (f *fakePlane) RemoveOverlay(vni uint32) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.overlays, vni)
	delete(f.peers, vni)
	for id, v := range f.eps { // the bridge ports go with the namespace
		if v == vni {
			delete(f.eps, id)
		}
	}
	return nil
}
func (f *fakePlane) Overlays() ([]uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []uint32
	for v := range f.overlays {
		out = append(out, v)
	}
	return out, nil
}
func (f *fakePlane) AddEndpoint(vni uint32, ep Endpoint) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.overlays[vni]; !ok {
		return "", fmt.Errorf("overlay %d not built", vni)
	}
	f.eps[ep.ID] = vni
	return "veth" + ep.ID[:4], nil
}
func (f *fakePlane) RemoveEndpoint(vni uint32, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.eps, id)
	return nil
}
func (f *fakePlane) HasEndpoint(vni uint32, id string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.eps[id]
	return ok, nil
}
func (f *fakePlane) DisableEndpoint(vni uint32, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.disabled == nil {
		f.disabled = map[string]bool{}
	}
	if _, ok := f.eps[id]; ok {
		f.disabled[id] = true
	}
	return nil
}
func (f *fakePlane) SetPeers(vni uint32, peers []Peer) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.peers[vni] = peers
	return len(peers), nil
}

// UpdatePeers applies d to the recorded peers, by MAC: Remove takes out
// the peers with its MACs, Add replaces the peer with its MAC or adds it.
// (Hosts are not recorded.)
func (f *fakePlane) UpdatePeers(vni uint32, d PeerDelta) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	peers := slices.Clone(f.peers[vni])
	changes := 0
	for _, r := range d.Remove {
		n := len(peers)
		peers = slices.DeleteFunc(peers, func(p Peer) bool { return bytes.Equal(p.MAC, r.MAC) })
		changes += n - len(peers)
	}
	for _, a := range d.Add {
		if i := slices.IndexFunc(peers, func(p Peer) bool { return bytes.Equal(p.MAC, a.MAC) }); i >= 0 {
			peers[i] = a
		} else {
			peers = append(peers, a)
		}
		changes++
	}
	f.peers[vni] = peers
	return changes, nil
}

func (f *fakePlane) peerIPs(vni uint32) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, p := range f.peers[vni] {
		for _, ip := range p.IPs {
			out = append(out, ip.String()+"@"+p.Host.String())
		}
	}
	slices.Sort(out)
	return out
}

func (f *fakePlane) vnis() []uint32 {
	v, _ := f.Overlays()
	slices.Sort(v)
	return v
}

type testHost struct {
	d     *Driver
	plane *fakePlane
	stop  context.CancelFunc
}

func newHost(t *testing.T, s store.Store, addr string) *testHost {
	ctx, cancel := context.WithCancel(context.Background())
	p := newFakePlane()
	d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	return &testHost{d: d, plane: p, stop: cancel}
}

func openStore(t testing.TB) store.Store {
	s, err := bolt.Open(context.Background(), store.Config{URL: "bolt://" + filepath.Join(t.TempDir(), "s.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func createReq(id, subnet string, opts map[string]string) *network.CreateNetworkRequest {
	generic := map[string]interface{}{}
	for k, v := range opts {
		generic[k] = v
	}
	return &network.CreateNetworkRequest{
		NetworkID: id,
		Options:   map[string]interface{}{genericKey: generic},
		IPv4Data:  []*network.IPAMData{{AddressSpace: ipam.LocalSpace, Pool: subnet, Gateway: strings.TrimSuffix(subnet, "0/24") + "1/24"}},
	}
}

// eventually waits for ok, failing after 15 s: several store watches and
// once-a-second polls (multicast) may lie between a change and what it
// makes, on a machine busy with other tests.
func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not true within 15s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOneOverlayAcrossHosts(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	opts := map[string]string{"overlay": "blue"}
	if err := a.d.CreateNetwork(ctx, createReq("netA", "10.20.0.0/24", opts)); err != nil {
		t.Fatal(err)
	}
	if err := b.d.CreateNetwork(ctx, createReq("netB", "10.20.0.0/24", opts)); err != nil {
		t.Fatalf("second host joining the same overlay: %v", err)
	}
	na, _ := a.d.network(ctx, "netA")
	nb, _ := b.d.network(ctx, "netB")
	if na.Overlay.VNI == 0 || na.Overlay.VNI != nb.Overlay.VNI {
		t.Fatalf("vni differs across hosts: %d vs %d", na.Overlay.VNI, nb.Overlay.VNI)
	}
	vni := na.Overlay.VNI

	joinEP(t, a, "netA", "epa1aaaa", "10.20.0.2/24")
	joinEP(t, b, "netB", "epb1bbbb", "10.20.0.3/24")
	eventually(t, "host a programs b's endpoint", func() bool {
		return slices.Equal(a.plane.peerIPs(vni), []string{"10.20.0.3@192.0.2.2"})
	})
	eventually(t, "host b programs a's endpoint", func() bool {
		return slices.Equal(b.plane.peerIPs(vni), []string{"10.20.0.2@192.0.2.1"})
	})

	// Host b dies: its live key goes, and a forgets its endpoints.
	b.stop()
	s.Delete(ctx, hostKey("192.0.2.2"))
	eventually(t, "host a drops the dead host's endpoint", func() bool { return len(a.plane.peerIPs(vni)) == 0 })

	// The last local endpoint takes the overlay's kernel state with it.
	leaveEP(t, a, "netA", "epa1aaaa")
	eventually(t, "host a removes the overlay", func() bool { return len(a.plane.vnis()) == 0 })
}

func joinEP(t *testing.T, h *testHost, netID, epID, addr string) {
	t.Helper()
	ctx := context.Background()
	resp, err := h.d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: netID, EndpointID: epID, Interface: &network.EndpointInterface{Address: addr}})
	if err != nil {
		t.Fatalf("create endpoint: %v", err)
	}
	if resp.Interface == nil || resp.Interface.MacAddress == "" || resp.Interface.Address != "" {
		t.Fatalf("create endpoint must return only a MAC, got %+v", resp.Interface)
	}
	j, err := h.d.Join(ctx, &network.JoinRequest{NetworkID: netID, EndpointID: epID, SandboxKey: "/nonexistent"})
	if err != nil {
		t.Fatalf("join: %v", err)
	}
	if j.InterfaceName.SrcName == "" || j.InterfaceName.DstPrefix != "eth" || j.Gateway != "" {
		t.Fatalf("join reply %+v", j)
	}
}

func leaveEP(t *testing.T, h *testHost, netID, epID string) {
	t.Helper()
	ctx := context.Background()
	if err := h.d.Leave(ctx, &network.LeaveRequest{NetworkID: netID, EndpointID: epID}); err != nil {
		t.Fatal(err)
	}
	if err := h.d.DeleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: netID, EndpointID: epID}); err != nil {
		t.Fatal(err)
	}
}

func TestMismatchedOverlayIsRefused(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	if err := a.d.CreateNetwork(ctx, createReq("n1", "10.20.0.0/24", map[string]string{"overlay": "blue", "vni": "5000"})); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		subnet string
		opts   map[string]string
		want   string
	}{
		{"10.30.0.0/24", map[string]string{"overlay": "blue"}, "already exists with subnets"},
		{"10.20.0.0/24", map[string]string{"overlay": "blue", "vni": "5001"}, "already exists with vni 5000"},
		{"10.20.0.0/24", map[string]string{"overlay": "blue", "encap": "gre"}, "gretap"},
		{"10.40.0.0/24", map[string]string{"overlay": "green", "vni": "5000"}, `vni 5000 is already used by overlay "blue"`},
		{"10.20.0.0/24", map[string]string{"colour": "red"}, `unknown option "colour"`},
		{"10.20.0.0/24", map[string]string{"vni": "0"}, "vni=\"0\": want a number from 1 to 16777215"},
		{"10.20.0.0/24", map[string]string{"mtu": "big"}, "mtu"},
	} {
		err := b.d.CreateNetwork(ctx, createReq("n2", c.subnet, c.opts))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %s %v: %v, want an error containing %q", c.subnet, c.opts, err, c.want)
		}
	}
	// Nothing of the refused networks was left in the store.
	kvs, _ := s.List(ctx, overlaysDir)
	if len(kvs) != 1 || kvs[0].Key != overlayKey("blue") {
		t.Fatalf("overlays after refusals: %v", kvs)
	}
	if _, err := s.Get(ctx, netmapKey("192.0.2.2", "n2")); err == nil {
		t.Fatal("a refused network was recorded")
	}
}

func TestOverlayGoesWithItsLastHost(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	for _, h := range []*testHost{a, b} {
		if err := h.d.CreateNetwork(ctx, createReq("n-"+h.d.host, "10.9.0.0/24", nil)); err != nil {
			t.Fatal(err)
		}
	}
	n, _ := a.d.network(ctx, "n-192.0.2.1")
	if n.Overlay.Name != "net-10-9-0-0-24" {
		t.Fatalf("overlay name derived from the subnet: %q", n.Overlay.Name)
	}
	if err := a.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "n-192.0.2.1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, overlayKey(n.Overlay.Name)); err != nil {
		t.Fatalf("overlay removed while host b still uses it: %v", err)
	}
	if err := b.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "n-192.0.2.2"}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{overlaysDir, vnisDir, netmapDir} {
		if kvs, _ := s.List(ctx, dir); len(kvs) != 0 {
			t.Errorf("%s left behind: %v", dir, kvs)
		}
	}
	if err := a.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "nope"}); err == nil || !strings.Contains(err.Error(), "not a network of this plugin") {
		t.Fatalf("delete of an unknown network: %v", err)
	}
}

func TestStateSurvivesARestart(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a := newHost(t, s, "192.0.2.1")
	if err := a.d.CreateNetwork(ctx, createReq("n1", "10.20.0.0/24", nil)); err != nil {
		t.Fatal(err)
	}
	joinEP(t, a, "n1", "ep1xxxxx", "10.20.0.2/24")
	a.stop()
	// A new process: nothing in memory; Docker replays nothing.
	a2 := newHost(t, s, "192.0.2.1")
	eventually(t, "the restarted plugin rebuilds the overlay", func() bool { return len(a2.plane.vnis()) == 1 })
	leaveEP(t, a2, "n1", "ep1xxxxx")
	if err := a2.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "n1"}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "overlay removed", func() bool { return len(a2.plane.vnis()) == 0 })
}
