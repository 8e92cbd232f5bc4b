package driver

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/store"
)

// fakeMcastPlane is a fakePlane that also steers multicast.
type fakeMcastPlane struct {
	*fakePlane
	mu     sync.Mutex
	groups map[uint32][]netip.Addr                // what the kernel learned here
	remote map[uint32]map[netip.Addr][]netip.Addr // what SetGroups was last told
}

func (f *fakeMcastPlane) Groups(vni uint32) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.groups[vni]), nil
}

func (f *fakeMcastPlane) SetGroups(vni uint32, remote map[netip.Addr][]netip.Addr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.remote[vni] = remote
	return 0, nil
}

func (f *fakeMcastPlane) setJoined(vni uint32, groups ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.groups[vni] = nil
	for _, g := range groups {
		f.groups[vni] = append(f.groups[vni], netip.MustParseAddr(g))
	}
}

// told prints what SetGroups was last told for vni, sorted.
func (f *fakeMcastPlane) told(vni uint32) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, g := range slices.SortedFunc(maps.Keys(f.remote[vni]), netip.Addr.Compare) {
		out = append(out, fmt.Sprintf("%s:%v", g, f.remote[vni][g]))
	}
	return fmt.Sprint(out)
}

func newMcastHost(t *testing.T, s store.Store, addr string) (*testHost, *fakeMcastPlane) {
	ctx, cancel := context.WithCancel(context.Background())
	p := &fakeMcastPlane{fakePlane: newFakePlane(), groups: map[uint32][]netip.Addr{}, remote: map[uint32]map[netip.Addr][]netip.Addr{}}
	d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	return &testHost{d: d, plane: p.fakePlane, stop: cancel}, p
}

// TestMulticastMemberships: a host publishes the groups its containers
// joined; the others send those groups to it, and stop when it leaves them,
// dies, or leaves the overlay.
func TestMulticastMemberships(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, pa := newMcastHost(t, s, "192.0.2.1")
	b, pb := newMcastHost(t, s, "192.0.2.2")
	c, pc := newMcastHost(t, s, "192.0.2.3")
	for _, h := range []*testHost{a, b, c} {
		if err := h.d.CreateNetwork(ctx, createReq("n-"+h.d.host, "10.20.0.0/24", map[string]string{"overlay": "mc"})); err != nil {
			t.Fatal(err)
		}
	}
	n, _ := a.d.network(ctx, "n-192.0.2.1")
	vni := n.Overlay.VNI
	joinEP(t, a, "n-192.0.2.1", "epa1aaaa", "10.20.0.2/24")
	joinEP(t, b, "n-192.0.2.2", "epb1bbbb", "10.20.0.3/24")
	joinEP(t, c, "n-192.0.2.3", "epc1cccc", "10.20.0.4/24")

	// Solicited-node groups (neighbour discovery) are not shared.
	pa.setJoined(vni, "239.1.1.1", "ff0e::1", "ff02::1:ff00:2")
	pc.setJoined(vni, "239.1.1.1")
	want := "[239.1.1.1:[192.0.2.1 192.0.2.3] ff0e::1:[192.0.2.1]]"
	eventually(t, "host b sends the groups to a and c", func() bool { return pb.told(vni) == want })
	eventually(t, "host a sends 239.1.1.1 to c only", func() bool { return pa.told(vni) == "[239.1.1.1:[192.0.2.3]]" })
	kv, err := s.Get(ctx, mcastKey("mc", "192.0.2.1"))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(kv.Value); got != fmt.Sprintf(`{"vni":%d,"groups":["239.1.1.1","ff0e::1"]}`, vni) {
		t.Errorf("a's record: %s", got)
	}

	// a's containers leave the groups: its record goes.
	pa.setJoined(vni)
	eventually(t, "host b stops sending to a", func() bool { return pb.told(vni) == "[239.1.1.1:[192.0.2.3]]" })
	eventually(t, "a's record deleted", func() bool {
		_, err := s.Get(ctx, mcastKey("mc", "192.0.2.1"))
		return err != nil
	})

	// c dies: its record stays, but nobody sends to it.
	c.stop()
	s.Delete(ctx, hostKey("192.0.2.3"))
	eventually(t, "host b stops sending to the dead host", func() bool { return pb.told(vni) == "[]" })

	// b's last endpoint leaves: the overlay, and b's record with it, go.
	pb.setJoined(vni, "239.2.2.2")
	eventually(t, "b publishes", func() bool { return pa.told(vni) == "[239.2.2.2:[192.0.2.2]]" })
	leaveEP(t, b, "n-192.0.2.2", "epb1bbbb")
	eventually(t, "b's record deleted with its overlay", func() bool {
		_, err := s.Get(ctx, mcastKey("mc", "192.0.2.2"))
		return err != nil
	})
	eventually(t, "host a stops sending to b", func() bool { return pa.told(vni) == "[]" })
}

// TestMulticastRoute: the first interface of a container on an overlay of
// this plugin gets 224.0.0.0/4 (connected); a second one in the same
// container does not (libnetwork would fail to add the same route twice).
func TestMulticastRoute(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a := newHost(t, s, "192.0.2.1")
	for _, n := range []string{"n1", "n2"} {
		subnet := map[string]string{"n1": "10.21.0.0/24", "n2": "10.22.0.0/24"}[n]
		if err := a.d.CreateNetwork(ctx, createReq(n, subnet, nil)); err != nil {
			t.Fatal(err)
		}
	}
	join := func(netID, epID, addr, sandbox string) []*network.StaticRoute {
		t.Helper()
		if _, err := a.d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: netID, EndpointID: epID, Interface: &network.EndpointInterface{Address: addr}}); err != nil {
			t.Fatal(err)
		}
		j, err := a.d.Join(ctx, &network.JoinRequest{NetworkID: netID, EndpointID: epID, SandboxKey: sandbox})
		if err != nil {
			t.Fatal(err)
		}
		return j.StaticRoutes
	}
	r := join("n1", "ep1aaaaa", "10.21.0.2/24", "/var/run/docker/netns/c1")
	if len(r) != 1 || r[0].Destination != "224.0.0.0/4" || r[0].RouteType != 1 || r[0].NextHop != "" {
		t.Fatalf("first interface's routes %+v, want 224.0.0.0/4 connected", r)
	}
	if r := join("n2", "ep2aaaaa", "10.22.0.2/24", "/var/run/docker/netns/c1"); len(r) != 0 {
		t.Fatalf("second interface of the same container got routes %+v", r)
	}
	if r := join("n2", "ep3aaaaa", "10.22.0.3/24", "/var/run/docker/netns/c2"); len(r) != 1 {
		t.Fatalf("another container's interface got routes %+v, want the multicast route", r)
	}
	// The holder leaves: the next interface of that container gets it.
	leaveEP(t, a, "n1", "ep1aaaaa")
	if r := join("n1", "ep4aaaaa", "10.21.0.4/24", "/var/run/docker/netns/c1"); len(r) != 1 {
		t.Fatalf("after the holder left, routes %+v, want the multicast route", r)
	}
}
