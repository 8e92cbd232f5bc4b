package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/store"
)

// newSwarmHost is newHost with the driver in global scope, as on a swarm node.
func newSwarmHost(t *testing.T, s store.Store, addr string) *testHost {
	ctx, cancel := context.WithCancel(context.Background())
	p := newFakePlane()
	d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), Scope: network.GlobalScope,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	return &testHost{d: d, plane: p, stop: cancel}
}

func allocateReq(id, subnet string, opts map[string]string) *network.AllocateNetworkRequest {
	return &network.AllocateNetworkRequest{
		NetworkID: id,
		Options:   opts,
		IPv4Data:  []network.IPAMData{{Pool: subnet, Gateway: strings.TrimSuffix(subnet, "0/24") + "1/24"}},
	}
}

// TestSwarmNetwork: the manager's AllocateNetwork claims the overlay and
// returns its name and VNI with the user's options; every node's
// CreateNetwork with those options joins that overlay; FreeNetwork and the
// nodes' DeleteNetwork together remove it, whatever their order.
func TestSwarmNetwork(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mgr, node := newSwarmHost(t, s, "192.0.2.1"), newSwarmHost(t, s, "192.0.2.2")

	res, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm1", "10.60.0.0/24", map[string]string{"mtu": "1400"}))
	if err != nil {
		t.Fatal(err)
	}
	opts := res.Options
	if opts["mtu"] != "1400" || opts["overlay"] != "net-10-60-0-0-24" || opts["vni"] == "" {
		t.Fatalf("AllocateNetwork options %v: want the user's mtu, the overlay and its vni", opts)
	}
	// A restarted manager or a new leader allocates again, with what it got.
	again, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm1", "10.60.0.0/24", opts))
	if err != nil || again.Options["vni"] != opts["vni"] || again.Options["overlay"] != opts["overlay"] {
		t.Fatalf("second AllocateNetwork: %v, %v; want the same overlay and vni as %v", again, err, opts)
	}

	for _, h := range []*testHost{mgr, node} {
		if err := h.d.CreateNetwork(ctx, createReq("swarm1", "10.60.0.0/24", opts)); err != nil {
			t.Fatalf("%s: CreateNetwork with the allocated options: %v", h.d.host, err)
		}
		n, err := h.d.network(ctx, "swarm1")
		if err != nil {
			t.Fatal(err)
		}
		if got := overlayOf(n); got.MTU != 1400 || opts["vni"] != strconv.FormatUint(uint64(got.VNI), 10) {
			t.Fatalf("%s: overlay %+v, want mtu 1400 and vni %s", h.d.host, got, opts["vni"])
		}
	}

	// The network is gone from the swarm (FreeNetwork) before the nodes
	// delete their copies: the overlay stays until the last one does.
	if err := mgr.d.FreeNetwork(ctx, &network.FreeNetworkRequest{NetworkID: "swarm1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, overlayKey("net-10-60-0-0-24")); err != nil {
		t.Fatalf("overlay removed while nodes still use it: %v", err)
	}
	for _, h := range []*testHost{mgr, node} {
		if err := h.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "swarm1"}); err != nil {
			t.Fatal(err)
		}
	}
	// The other order: nodes first, FreeNetwork last.
	res, err = mgr.d.AllocateNetwork(ctx, allocateReq("swarm2", "10.61.0.0/24", nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := node.d.CreateNetwork(ctx, createReq("swarm2", "10.61.0.0/24", res.Options)); err != nil {
		t.Fatal(err)
	}
	if err := node.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "swarm2"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, overlayKey("net-10-61-0-0-24")); err != nil {
		t.Fatalf("overlay removed while the swarm still holds it: %v", err)
	}
	for range 2 { // FreeNetwork is idempotent
		if err := mgr.d.FreeNetwork(ctx, &network.FreeNetworkRequest{NetworkID: "swarm2"}); err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []string{overlaysDir, vnisDir, netmapDir} {
		if kvs, _ := s.List(ctx, dir); len(kvs) != 0 {
			t.Errorf("%s left behind: %v", dir, kvs)
		}
	}
}

// TestSwarmAndPlainOverlaysStayApart: a swarm network and plain hosts'
// networks share a store but never an overlay (their addresses come from
// different allocators), and each refusal names the reason.
func TestSwarmAndPlainOverlaysStayApart(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	mgr, plain := newSwarmHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.9")
	res, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm1", "10.60.0.0/24", nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := plain.d.CreateNetwork(ctx, createReq("plain1", "10.70.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		what string
		try  func() error
		want string
	}{
		{"plain network on the swarm network's subnet", func() error {
			return plain.d.CreateNetwork(ctx, createReq("plain2", "10.60.0.0/24", nil))
		}, "belongs to swarm network swarm1"},
		{"plain network naming the swarm network's overlay", func() error {
			return plain.d.CreateNetwork(ctx, createReq("plain2", "10.60.0.0/24", map[string]string{"overlay": res.Options["overlay"]}))
		}, "a plain network cannot join it"},
		{"swarm network naming a plain overlay", func() error {
			_, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm2", "10.70.0.0/24", map[string]string{"overlay": "blue"}))
			return err
		}, "used by plain (non-swarm) networks on hosts [192.0.2.9]"},
		{"second swarm network on the same subnet", func() error {
			_, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm3", "10.60.0.0/24", nil))
			return err
		}, "belongs to swarm network swarm1"},
		{"unknown option", func() error {
			_, err := mgr.d.AllocateNetwork(ctx, allocateReq("swarm4", "10.80.0.0/24", map[string]string{"colour": "red"}))
			return err
		}, `unknown option "colour"`},
	} {
		if err := c.try(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.what, err, c.want)
		}
	}
	kvs, _ := s.List(ctx, overlaysDir)
	if len(kvs) != 2 {
		t.Fatalf("overlays after the refusals: %v; want blue and the swarm network's", kvs)
	}
}
