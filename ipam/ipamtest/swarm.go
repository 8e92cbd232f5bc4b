package ipamtest

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	dnpipam "github.com/dnplabs/docker-net-plugin/ipam"
)

// testSwarm is IPAM as a swarm calls it (seen on dockerd 20.10). The
// manager allocates in the global space: the gateway, then every VIP and
// task address, without a MAC and with libnetwork's "serial" option. Each
// node then requests the same subnet in the local space, the gateway and
// its own tasks' addresses explicitly, with their MACs. Nothing is handed
// out twice, in either space; a task that moves gets a new address; a
// restarted manager or a new leader requests everything again, which
// works; a second network on the same subnet does not; and releasing
// everything, as swarm does, leaves nothing in the store.
func testSwarm(t *testing.T, e *env) {
	mac := func(o *dnpipam.Options) { o.RequireMACAddress = true }
	mgr, n1, n2 := e.host("manager", mac), e.host("node1", mac), e.host("node2", mac)
	leader := e.host("manager2", mac)
	serial := map[string]string{"com.docker.network.ipam.serial": "true"}
	gwSerial := map[string]string{"RequestAddressType": "com.docker.network.gateway", "com.docker.network.ipam.serial": "true"}
	endpoint := func(mac string) map[string]string {
		return map[string]string{"com.docker.network.endpoint.macaddress": mac}
	}

	// The manager: pool, gateway, a VIP and two tasks.
	g := pool(t, mgr, dnpipam.GlobalSpace, "10.41.0.0/24", "", false, nil).PoolID
	gw := addr(t, mgr, g, "", gwSerial)
	vip := addr(t, mgr, g, "", serial)
	t1 := addr(t, mgr, g, "", serial)
	t2 := addr(t, mgr, g, "", serial)
	// The pool request of a network's second subnet carries the options of
	// the first one's gateway request.
	g6 := pool(t, mgr, dnpipam.GlobalSpace, "fd41::/64", "", true, gwSerial).PoolID
	gw6 := addr(t, mgr, g6, "", gwSerial)
	// An explicit address (docker run --ip on an attachable network) comes
	// without a MAC too, but is exclusive in the global space.
	att := addr(t, mgr, g, "10.41.0.100", serial)
	_, err := requestAddr(mgr, g, "10.41.0.100", serial)
	wantErr(t, err, dnpipam.ErrInUse, "the same explicit address twice in the global space", "10.41.0.100")
	seen := map[string]bool{}
	for _, a := range []string{gw, vip, t1, t2, att} {
		if seen[a] {
			t.Fatalf("the manager got %s twice: gateway %s, vip %s, tasks %s %s, attachment %s", a, gw, vip, t1, t2, att)
		}
		seen[a] = true
	}

	// The nodes: local pool, the manager's gateway, their tasks' addresses.
	l := localPool(t, n1, "10.41.0.0/24", "")
	localPool(t, n2, "10.41.0.0/24", "")
	for _, n := range []*dnpipam.Driver{n1, n2} {
		if got := addr(t, n, l, ipOf(gw), gatewayOpts); got != gw {
			t.Fatalf("%s: gateway %s, want the manager's %s", n.HostID(), got, gw)
		}
	}
	if got := addr(t, n1, l, ipOf(t1), endpoint("02:42:0a:29:00:03")); got != t1 {
		t.Fatalf("node1: task address %s, want %s", got, t1)
	}
	if got := addr(t, n2, l, ipOf(t2), endpoint("02:42:0a:29:00:04")); got != t2 {
		t.Fatalf("node2: task address %s, want %s", got, t2)
	}
	_, err = requestAddr(n2, l, ipOf(t1), endpoint("02:42:0a:29:00:05"))
	wantErr(t, err, dnpipam.ErrInUse, "node2 asks for node1's task address", ipOf(t1), "node1")

	// node1's task moves to node2: node1 releases its address, the manager
	// frees it and allocates the replacement, which is not the same one.
	release(t, n1, l, t1)
	release(t, mgr, g, t1)
	t3 := addr(t, mgr, g, "", serial)
	if t3 == t1 {
		t.Fatalf("the moved task got its old address %s again at once", t1)
	}
	addr(t, n2, l, ipOf(t3), endpoint("02:42:0a:29:00:06"))

	// Another manager takes over (or the manager restarts): swarm requests
	// the network's pools and gateways and every address it holds again.
	for _, sub := range []struct{ id, subnet, gw string }{{g, "10.41.0.0/24", gw}, {g6, "fd41::/64", gw6}} {
		if id := pool(t, leader, dnpipam.GlobalSpace, sub.subnet, "", sub.subnet == "fd41::/64", nil).PoolID; id != sub.id {
			t.Fatalf("new leader: pool %s, want %s", id, sub.id)
		}
		if got := addr(t, leader, sub.id, ipOf(sub.gw), gwSerial); got != sub.gw {
			t.Fatalf("new leader: gateway %s, want %s", got, sub.gw)
		}
	}
	for _, a := range []string{vip, t2, t3, att} {
		if got := addr(t, leader, g, ipOf(a), serial); got != a {
			t.Fatalf("new leader requests %s again: got %s", a, got)
		}
	}
	// After that, addresses are exclusive again, and a second network
	// cannot take the subnet.
	_, err = requestAddr(leader, g, ipOf(att), serial)
	wantErr(t, err, dnpipam.ErrInUse, "an explicit address the new leader holds", ipOf(att))
	t4 := addr(t, leader, g, "", serial)
	if seen[t4] || t4 == t3 {
		t.Fatalf("the new leader handed out %s, already in use", t4)
	}
	pool(t, leader, dnpipam.GlobalSpace, "10.41.0.0/24", "", false, nil)
	_, err = requestAddr(leader, g, "", gwSerial)
	wantErr(t, err, dnpipam.ErrInUse, "a second swarm network on the subnet", "10.41.0.0/24", "swarm network")
	releasePool(t, leader, g) // swarm's rollback
	release(t, leader, g, t4)
	mgr = leader

	// Everything goes, as swarm removes it: tasks on the nodes, the nodes'
	// networks, then the manager's addresses, gateways and pools.
	release(t, n2, l, t2)
	release(t, n2, l, t3)
	for _, n := range []*dnpipam.Driver{n1, n2} {
		release(t, n, l, gw)
		releasePool(t, n, l)
	}
	for _, a := range []string{vip, t2, t3, att, gw} {
		release(t, mgr, g, a)
	}
	release(t, mgr, g6, gw6)
	releasePool(t, mgr, g)
	releasePool(t, mgr, g6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	left, err := e.b.Open(t, e.ns).List(ctx, dnpipam.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Fatalf("store keys left after everything was released: %v", keys(left))
	}
}

// testCarveAcrossSpaces: pools carved from the default range never get a
// subnet the other address space uses, so a swarm network and a plain
// network without --subnet get different subnets.
func testCarveAcrossSpaces(t *testing.T, e *env) {
	opts := func(o *dnpipam.Options) {
		o.DefaultPools = []dnpipam.DefaultPool{{Base: netip.MustParsePrefix("10.211.0.0/23"), Size: 24}}
	}
	mgr, plain := e.host("manager", opts), e.host("plain", opts)
	carve := func(d *dnpipam.Driver, space string) (*ipam.RequestPoolResponse, error) {
		return d.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: space})
	}
	sw, err := carve(mgr, dnpipam.GlobalSpace)
	if err != nil || sw.Pool != "10.211.0.0/24" {
		t.Fatalf("carve in the global space: %+v, %v", sw, err)
	}
	pl, err := carve(plain, dnpipam.LocalSpace)
	if err != nil || pl.Pool != "10.211.1.0/24" {
		t.Fatalf("carve in the local space while the global space has 10.211.0.0/24: %+v, %v", pl, err)
	}
	_, err = carve(mgr, dnpipam.GlobalSpace)
	wantErr(t, err, dnpipam.ErrNoDefaultPool, "default range used up by both spaces", "10.211.0.0/23")
	releasePool(t, mgr, sw.PoolID)
	releasePool(t, plain, pl.PoolID)
}
