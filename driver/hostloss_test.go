package driver

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	dipam "github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// startHost runs a driver on plane with a short liveness TTL.
func startHost(t *testing.T, s store.Store, addr string, plane *fakePlane) *testHost {
	ctx, cancel := context.WithCancel(context.Background())
	d := New(Config{Store: s, Plane: plane, HostAddr: netip.MustParseAddr(addr), LiveTTL: 100 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	stop := func() { cancel(); <-d.Done() }
	t.Cleanup(stop)
	return &testHost{d: d, plane: plane, stop: stop}
}

func TestHostLossReleasesAndRestores(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	const lost = "192.0.2.3"
	a := startHost(t, s, "192.0.2.1", newFakePlane())
	startHost(t, s, "192.0.2.2", newFakePlane()) // a bystander: only the lowest host collects
	c := startHost(t, s, lost, newFakePlane())
	ipa := ipam.New(s, ipam.Options{HostID: "192.0.2.1", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	ipc := ipam.New(s, ipam.Options{HostID: lost, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	pool, err := ipc.RequestPool(ctx, &dipam.RequestPoolRequest{AddressSpace: ipam.LocalSpace, Pool: "10.20.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	claim := func(d *ipam.Driver, ip string) {
		t.Helper()
		if _, err := d.RequestAddress(ctx, &dipam.RequestAddressRequest{PoolID: pool.PoolID, Address: ip}); err != nil {
			t.Fatalf("request %s: %v", ip, err)
		}
	}
	opts := map[string]string{"overlay": "blue"}
	for _, h := range []*testHost{a, c} {
		if err := h.d.CreateNetwork(ctx, createReq("net"+h.d.host, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	claim(ipa, "10.20.0.2")
	joinEP(t, a, "net192.0.2.1", "epa1aaaa", "10.20.0.2/24")
	for _, ep := range []struct{ id, ip string }{{"epc1cccc", "10.20.0.3"}, {"epc2cccc", "10.20.0.4"}, {"epc3cccc", "10.20.0.5"}} {
		claim(ipc, ep.ip)
		joinEP(t, c, "net"+lost, ep.id, ep.ip+"/24")
	}
	n, _ := a.d.network(ctx, "net192.0.2.1")
	vni := n.Overlay.VNI
	eventually(t, "host a programs c's endpoints", func() bool { return len(a.plane.peerIPs(vni)) == 3 })

	// Host c is lost: its live key goes (here at once; a crash lets it
	// expire after the TTL). Host a releases its endpoints and addresses.
	c.stop()
	eventually(t, "c's endpoints become orphans and their addresses free", func() bool {
		return len(keys(t, s, endpointsDir)) == 1 && len(keys(t, s, orphansOf(lost))) == 3 &&
			slices.Equal(addrs(t, s), []string{"10.20.0.2@192.0.2.1"})
	})
	eventually(t, "host a drops the lost host's peers", func() bool { return len(a.plane.peerIPs(vni)) == 0 })
	// Their MAC and address claims went with the records.
	if got := keys(t, s, addrsDir); !slices.Equal(got, []string{addrKey("blue", netip.MustParseAddr("10.20.0.2"))}) || len(keys(t, s, macsDir)) != 1 {
		t.Fatalf("claims after c's endpoints were orphaned: %v %v; want a's only", got, keys(t, s, macsDir))
	}
	// Idempotent: a repeated or concurrent collection changes nothing.
	if err := orphanHost(ctx, s, lost, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatal(err)
	}
	if len(keys(t, s, orphansOf(lost))) != 3 || len(addrs(t, s)) != 1 {
		t.Fatalf("second collection changed the store: %v %v", keys(t, s, orphansDir), addrs(t, s))
	}

	// Meanwhile: one of c's containers went away, and host a took the
	// address of another.
	delete(c.plane.eps, "epc2cccc")
	claim(ipa, "10.20.0.5")

	// Host c comes back (same kernel): it restores the surviving endpoint.
	c2 := startHost(t, s, lost, c.plane)
	eventually(t, "c restores its surviving endpoint", func() bool {
		return slices.Equal(keys(t, s, orphansDir), []string{orphanKey(lost, "epc3cccc")}) &&
			slices.Equal(addrs(t, s), []string{"10.20.0.2@192.0.2.1", "10.20.0.3@" + lost, "10.20.0.5@192.0.2.1"})
	})
	eventually(t, "host a programs c's endpoint again", func() bool {
		return slices.Equal(a.plane.peerIPs(vni), []string{"10.20.0.3@" + lost})
	})
	if _, err := s.Get(ctx, endpointKey("blue", "epc1cccc")); err != nil {
		t.Fatalf("restored endpoint record: %v", err)
	}
	if got := keys(t, s, addrsDir); !slices.Equal(got, []string{addrKey("blue", netip.MustParseAddr("10.20.0.2")), addrKey("blue", netip.MustParseAddr("10.20.0.3"))}) || len(keys(t, s, macsDir)) != 2 {
		t.Fatalf("claims after c restored its endpoint: %v %v; want a's and c's restored one", got, keys(t, s, macsDir))
	}
	// The endpoint whose address went to host a gave it up, visibly: its
	// port is down, and its orphan record says why.
	eventually(t, "the late holder of 10.20.0.5 gives it up", func() bool {
		c.plane.mu.Lock()
		defer c.plane.mu.Unlock()
		return c.plane.disabled["epc3cccc"]
	})
	if kv, err := s.Get(ctx, orphanKey(lost, "epc3cccc")); err != nil || !strings.Contains(string(kv.Value), "10.20.0.5 was allocated again") {
		t.Fatalf("orphan record of the endpoint that gave up its address: %s, %v", kv.Value, err)
	}
	c.plane.mu.Lock()
	if c.plane.disabled["epc1cccc"] {
		t.Error("the restored endpoint was taken down too")
	}
	c.plane.mu.Unlock()

	// Docker's cleanup of the endpoints the store no longer knows succeeds.
	for _, id := range []string{"epc2cccc", "epc3cccc"} {
		if err := c2.d.Leave(ctx, &network.LeaveRequest{NetworkID: "net" + lost, EndpointID: id}); err != nil {
			t.Fatalf("leave unknown endpoint: %v", err)
		}
		if err := c2.d.DeleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: "net" + lost, EndpointID: id}); err != nil {
			t.Fatalf("delete unknown endpoint: %v", err)
		}
	}
	if got := keys(t, s, orphansDir); len(got) != 0 {
		t.Fatalf("orphans left after Docker deleted the endpoints: %v", got)
	}
	// c's Docker releasing the address that host a holds now must not free it.
	_, err = ipc.Release(ctx, pool.PoolID, "10.20.0.5")
	if !errors.Is(err, ipam.ErrNotHeld) {
		t.Fatalf("releasing another host's address: %v, want ErrNotHeld", err)
	}
}

func keys(t *testing.T, s store.Store, dir string) []string {
	t.Helper()
	kvs, err := s.List(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range kvs {
		out = append(out, kv.Key)
	}
	return out
}

// addrs lists the allocated endpoint addresses as ip@host.
func addrs(t *testing.T, s store.Store) []string {
	t.Helper()
	kvs, err := s.List(context.Background(), ipam.AddrsDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range kvs {
		var a ipam.Allocation
		if err := json.Unmarshal(kv.Value, &a); err != nil {
			t.Fatal(err)
		}
		if a.Kind == ipam.KindAddress {
			out = append(out, a.Address+"@"+a.Host)
		}
	}
	slices.Sort(out)
	return out
}
