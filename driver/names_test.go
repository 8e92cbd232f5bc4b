package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/ipam"
)

// fakeNames records what the driver tells the name service.
type fakeNames struct {
	mu     sync.Mutex
	up     []uint32          // VNIs OverlayUp was called with
	joined map[string]string // endpoint id -> sandbox key
	left   []string
	seen   []KnownEndpoint
	live   []string
}

func (f *fakeNames) Join(ov Overlay, endpointID, sandboxKey string) []*network.StaticRoute {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.joined[endpointID] = sandboxKey
	return []*network.StaticRoute{{Destination: "169.254.53.53/32", RouteType: 1}}
}

func (f *fakeNames) Leave(endpointID string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.left = append(f.left, endpointID)
}

func (f *fakeNames) Observe(eps []KnownEndpoint, live []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen, f.live = eps, live
}

func (f *fakeNames) OverlayUp(ov Overlay) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.up = append(f.up, ov.VNI)
}

func (f *fakeNames) OverlayDown(vni uint32) {}

func (f *fakeNames) snapshot() ([]KnownEndpoint, []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.seen), slices.Clone(f.live)
}

// TestNameServiceHook: Join hands the container the name service's
// route; the name service sees every endpoint of the store with its
// addresses, and the live hosts; Leave and DeleteEndpoint tell it.
func TestNameServiceHook(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	fn := &fakeNames{joined: map[string]string{}}
	run, cancel := context.WithCancel(ctx)
	d := New(Config{Store: s, Plane: newFakePlane(), HostAddr: netip.MustParseAddr("192.0.2.1"), Names: fn,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(run)
	t.Cleanup(func() { cancel(); <-d.Done() })
	other := newHost(t, s, "192.0.2.2")

	dualStack := func(id string) *network.CreateNetworkRequest {
		r := createReq(id, "10.20.0.0/24", map[string]string{"overlay": "blue"})
		r.IPv6Data = []*network.IPAMData{{AddressSpace: ipam.LocalSpace, Pool: "fd00::/64"}}
		return r
	}
	if err := d.CreateNetwork(ctx, dualStack("n1")); err != nil {
		t.Fatal(err)
	}
	if err := other.d.CreateNetwork(ctx, dualStack("n2")); err != nil {
		t.Fatal(err)
	}
	if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: "n1", EndpointID: "ep1aaaaa",
		Interface: &network.EndpointInterface{Address: "10.20.0.2/24", AddressIPv6: "fd00::2/64"}}); err != nil {
		t.Fatal(err)
	}
	j, err := d.Join(ctx, &network.JoinRequest{NetworkID: "n1", EndpointID: "ep1aaaaa", SandboxKey: "/var/run/docker/netns/sb1"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(j.StaticRoutes, func(r *network.StaticRoute) bool { return r.Destination == "169.254.53.53/32" }) {
		t.Errorf("Join's routes %+v, want the name service's among them", j.StaticRoutes)
	}
	fn.mu.Lock()
	up := slices.Clone(fn.up)
	fn.mu.Unlock()
	if len(up) == 0 {
		t.Errorf("name service not told that the overlay is up")
	}
	if fn.joined["ep1aaaaa"] != "/var/run/docker/netns/sb1" {
		t.Errorf("name service told of joins %v", fn.joined)
	}
	joinEP(t, other, "n2", "ep2bbbbb", "10.20.0.3/24")

	eventually(t, "the name service sees both endpoints and both hosts", func() bool {
		eps, live := fn.snapshot()
		slices.Sort(live)
		return len(eps) == 2 && slices.Equal(live, []string{"192.0.2.1", "192.0.2.2"})
	})
	eps, _ := fn.snapshot()
	slices.SortFunc(eps, func(a, b KnownEndpoint) int { return strings.Compare(a.ID, b.ID) })
	want := []KnownEndpoint{
		{Overlay: "blue", ID: "ep1aaaaa", Network: "n1", Host: "192.0.2.1", IPv4: netip.MustParseAddr("10.20.0.2"), IPv6: netip.MustParseAddr("fd00::2")},
		{Overlay: "blue", ID: "ep2bbbbb", Network: "n2", Host: "192.0.2.2", IPv4: netip.MustParseAddr("10.20.0.3")},
	}
	if !slices.Equal(eps, want) {
		t.Errorf("name service saw %+v, want %+v", eps, want)
	}

	if err := d.Leave(ctx, &network.LeaveRequest{NetworkID: "n1", EndpointID: "ep1aaaaa"}); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: "n1", EndpointID: "ep1aaaaa"}); err != nil {
		t.Fatal(err)
	}
	fn.mu.Lock()
	left := slices.Clone(fn.left)
	fn.mu.Unlock()
	if !slices.Equal(left, []string{"ep1aaaaa", "ep1aaaaa"}) {
		t.Errorf("name service told of leaves %v, want Leave and DeleteEndpoint", left)
	}
	eventually(t, "the name service sees the endpoint gone", func() bool {
		eps, _ := fn.snapshot()
		return len(eps) == 1 && eps[0].ID == "ep2bbbbb"
	})
}
