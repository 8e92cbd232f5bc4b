package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// What status and doctor read: the cluster as recorded, and the kernel
// state one host should have, computed the way the running plugin does.
func TestInspectCluster(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	opts := map[string]string{"overlay": "blue"}
	if err := a.d.CreateNetwork(ctx, createReq("netA", "10.20.0.0/24", opts)); err != nil {
		t.Fatal(err)
	}
	if err := b.d.CreateNetwork(ctx, createReq("netB", "10.20.0.0/24", opts)); err != nil {
		t.Fatal(err)
	}
	joinEP(t, a, "netA", "epa1aaaa", "10.20.0.2/24")
	joinEP(t, b, "netB", "epb1bbbb", "10.20.0.3/24")
	na, _ := a.d.network(ctx, "netA")
	vni := na.Overlay.VNI
	eventually(t, "both hosts registered", func() bool {
		kvs, _ := s.List(ctx, hostsDir)
		return len(kvs) == 2
	})

	cs, err := ReadCluster(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Hosts) != 2 || !cs.Hosts[0].Alive || !cs.Hosts[1].Alive || cs.Hosts[0].Address != "192.0.2.1" {
		t.Fatalf("hosts %+v, want 192.0.2.1 and 192.0.2.2, both alive", cs.Hosts)
	}
	if cs.Hosts[0].Networks != 1 || cs.Hosts[0].Endpoints != 1 || cs.Hosts[0].Started.IsZero() {
		t.Errorf("host a: %+v, want 1 network, 1 endpoint and a start time", cs.Hosts[0])
	}
	if len(cs.Overlays) != 1 {
		t.Fatalf("overlays %+v, want blue only", cs.Overlays)
	}
	ov := cs.Overlays[0]
	if ov.Name != "blue" || ov.VNI != vni || ov.Encap != "vxlan" || !slices.Equal(ov.Subnets, []string{"10.20.0.0/24"}) || len(ov.Hosts) != 2 {
		t.Errorf("overlay %+v", ov)
	}
	var eps []string
	for _, ep := range ov.Endpoints {
		eps = append(eps, ep.ID+"@"+ep.Host+"="+ep.IPv4)
	}
	if !slices.Equal(eps, []string{"epa1aaaa@192.0.2.1=10.20.0.2/24", "epb1bbbb@192.0.2.2=10.20.0.3/24"}) {
		t.Errorf("endpoints %v", eps)
	}

	plan, err := DesiredState(ctx, s, netip.MustParseAddr("192.0.2.1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Overlays) != 1 {
		t.Fatalf("plan of a: %+v, want overlay blue", plan.Overlays)
	}
	po := plan.Overlays[0]
	if po.VNI != vni || po.Name != "blue" || !slices.Equal(po.Networks, []string{"netA"}) ||
		len(po.Endpoints) != 1 || po.Endpoints[0].ID != "epa1aaaa" {
		t.Errorf("planned overlay %+v", po)
	}
	if len(po.Peers) != 1 || po.Peers[0].Host.String() != "192.0.2.2" || po.Peers[0].IPs[0].String() != "10.20.0.3" {
		t.Errorf("planned peers %+v, want b's endpoint", po.Peers)
	}

	// Reconcile builds on an empty kernel exactly what the plan says.
	fresh := newFakePlane()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := Reconcile(ctx, s, fresh, netip.MustParseAddr("192.0.2.1"), quiet); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fresh.vnis(), []uint32{vni}) || !slices.Equal(fresh.peerIPs(vni), []string{"10.20.0.3@192.0.2.2"}) {
		t.Errorf("reconcile built %v with peers %v", fresh.vnis(), fresh.peerIPs(vni))
	}

	// Host b stops: it is no longer alive, but status still knows when it
	// was last seen; a no longer programs its endpoint.
	b.stop()
	eventually(t, "b's live key gone", func() bool {
		kvs, _ := s.List(ctx, hostsDir)
		return len(kvs) == 1
	})
	eventually(t, "b's last-seen time written", func() bool {
		cs, _ := ReadCluster(ctx, s)
		return cs != nil && len(cs.Hosts) == 2 && !cs.Hosts[1].Alive && !cs.Hosts[1].LastSeen.IsZero()
	})
	cs, _ = ReadCluster(ctx, s)
	if d := time.Since(cs.Hosts[1].LastSeen); d < 0 || d > time.Minute {
		t.Errorf("b last seen %v ago", d)
	}
	plan, err = DesiredState(ctx, s, netip.MustParseAddr("192.0.2.1"))
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Overlays) != 1 || len(plan.Overlays[0].Peers) != 0 || !slices.Equal(plan.LiveHosts, []string{"192.0.2.1"}) {
		t.Errorf("plan after b stopped: %+v", plan)
	}
}

// A host that stops with no network left leaves no trace behind.
func TestCleanStopLeavesNoLastSeen(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a := newHost(t, s, "192.0.2.1")
	eventually(t, "a's last-seen time written", func() bool {
		kvs, _ := s.List(ctx, seenDir)
		return len(kvs) == 1
	})
	a.stop()
	eventually(t, "a's last-seen time removed", func() bool {
		kvs, _ := s.List(ctx, seenDir)
		return len(kvs) == 0
	})
}
