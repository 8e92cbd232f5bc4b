package ipamtest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	dnpipam "github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

func testCapabilities(t *testing.T, e *env) {
	d := e.host("h1")
	c, err := d.GetCapabilities(context.Background())
	if err != nil || c.RequiresMACAddress {
		t.Fatalf("GetCapabilities = %+v, %v; want RequiresMACAddress false by default", c, err)
	}
	s, err := d.GetDefaultAddressSpaces(context.Background())
	if err != nil || s.LocalDefaultAddressSpace != dnpipam.LocalSpace || s.GlobalDefaultAddressSpace != dnpipam.GlobalSpace {
		t.Fatalf("GetDefaultAddressSpaces = %+v, %v", s, err)
	}
	m := e.host("h2", func(o *dnpipam.Options) { o.RequireMACAddress = true })
	if c, _ := m.GetCapabilities(context.Background()); !c.RequiresMACAddress {
		t.Fatalf("RequireMACAddress option not reported")
	}
}

// Host B asking for host A's pool gets the same pool; it stays while any
// host holds it.
func testPoolShared(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	ra := pool(t, a, dnpipam.LocalSpace, "10.20.0.0/24", "10.20.0.128/25", false, nil)
	rb := pool(t, b, dnpipam.LocalSpace, "10.20.0.0/24", "10.20.0.128/25", false, nil)
	const wantID = "dnp-local/10.20.0.0_24/10.20.0.128_25"
	if ra.PoolID != wantID || rb.PoolID != wantID || ra.Pool != "10.20.0.0/24" || rb.Pool != "10.20.0.0/24" {
		t.Fatalf("pools: A %+v, B %+v; want both %s with pool 10.20.0.0/24", ra, rb, wantID)
	}
	// The same subnet in the global space is another pool, no overlap.
	g := pool(t, a, dnpipam.GlobalSpace, "10.20.0.0/24", "", false, nil)
	if g.PoolID != "dnp-global/10.20.0.0_24" {
		t.Fatalf("global pool id %q", g.PoolID)
	}

	first := addr(t, a, wantID, "", nil)
	releasePool(t, a, wantID)
	// B still holds it: B allocates, and even A (no longer holding it)
	// can still address it because it exists.
	second := addr(t, b, wantID, "", nil)
	if first == second {
		t.Fatalf("A and B both got %s", first)
	}
	err := a.ReleasePool(context.Background(), &ipam.ReleasePoolRequest{PoolID: wantID})
	wantErr(t, err, dnpipam.ErrNotHeld, "A releases the pool a second time", wantID, "hostA", "hostB")

	release(t, a, wantID, first)
	release(t, b, wantID, second)
	releasePool(t, b, wantID)
	_, err = requestAddr(a, wantID, "", nil)
	wantErr(t, err, dnpipam.ErrUnknownPool, "address from a released pool", wantID)
	err = b.ReleasePool(context.Background(), &ipam.ReleasePoolRequest{PoolID: wantID})
	wantErr(t, err, dnpipam.ErrUnknownPool, "release a released pool", wantID)
	releasePool(t, a, g.PoolID)
}

// One host holding a pool twice (two networks) keeps it until both go.
func testPoolRefCount(t *testing.T, e *env) {
	a := e.host("hostA")
	id := localPool(t, a, "10.21.0.0/24", "")
	if again := localPool(t, a, "10.21.0.0/24", ""); again != id {
		t.Fatalf("second request of the same pool: %s, want %s", again, id)
	}
	releasePool(t, a, id)
	x := addr(t, a, id, "", nil)
	release(t, a, id, x)
	releasePool(t, a, id)
	_, err := requestAddr(a, id, "", nil)
	wantErr(t, err, dnpipam.ErrUnknownPool, "pool released twice by its only host", id)
	// A fresh driver (plugin restart) sees the same state.
	b := e.host("hostA")
	_, err = requestAddr(b, id, "", nil)
	wantErr(t, err, dnpipam.ErrUnknownPool, "after restart", id)
}

func testOverlap(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	big := localPool(t, a, "10.22.0.0/16", "")
	_, err := b.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.22.5.0/24"})
	wantErr(t, err, dnpipam.ErrOverlap, "smaller subnet inside a pool", "10.22.5.0/24", "10.22.0.0/16", big)

	small := localPool(t, b, "10.23.7.0/24", "")
	_, err = a.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.23.0.0/16"})
	wantErr(t, err, dnpipam.ErrOverlap, "bigger subnet around a pool", "10.23.0.0/16", "10.23.7.0/24", small)

	// IPv6 too.
	v6 := localPool(t, a, "fd00:22::/64", "")
	_, err = b.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "fd00:22::/56", V6: true})
	wantErr(t, err, dnpipam.ErrOverlap, "IPv6 overlap", "fd00:22::/56", "fd00:22::/64", v6)
}

// Pools on one subnet with different ip-ranges share its addresses: no
// address is ever handed out by both.
func testSharedSubnet(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	pa := localPool(t, a, "10.24.0.0/24", "10.24.0.0/27")
	pb := localPool(t, b, "10.24.0.0/24", "10.24.0.16/28")
	if pa == pb {
		t.Fatalf("different ip-ranges gave one pool id %s", pa)
	}
	// Both pools ask for the gateway: the subnet has one.
	ga, gb := addr(t, a, pa, "", gatewayOpts), addr(t, b, pb, "", gatewayOpts)
	if ga != "10.24.0.1/24" || gb != ga {
		t.Fatalf("gateways %s and %s, want 10.24.0.1/24 for both", ga, gb)
	}
	seen := map[string]string{}
	for i := 0; i < 14; i++ {
		for _, h := range []struct {
			d  *dnpipam.Driver
			id string
		}{{a, pa}, {b, pb}} {
			got, err := requestAddr(h.d, h.id, "", nil)
			if err != nil {
				if errors.Is(err, dnpipam.ErrExhausted) {
					continue
				}
				t.Fatal(err)
			}
			if prev, dup := seen[got]; dup {
				t.Fatalf("%s handed out twice: by %s and %s", got, prev, h.id)
			}
			seen[got] = h.id
		}
	}
	for x, id := range seen {
		p, _ := netip.ParsePrefix(x)
		want := netip.MustParsePrefix("10.24.0.0/27")
		if id == pb {
			want = netip.MustParsePrefix("10.24.0.16/28")
		}
		if !want.Contains(p.Addr()) {
			t.Fatalf("%s from pool %s is outside its ip-range %s", x, id, want)
		}
	}
}

func testBadInput(t *testing.T, e *env) {
	a := e.host("hostA")
	poolCases := []struct {
		name  string
		req   ipam.RequestPoolRequest
		kind  error
		parts []string
	}{
		{"malformed CIDR", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/33"}, dnpipam.ErrInvalid, []string{"malformed subnet", "10.30.0.0/33"}},
		{"not a CIDR", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "banana"}, dnpipam.ErrInvalid, []string{"banana"}},
		{"ip-range outside subnet", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", SubPool: "10.31.0.0/25"}, dnpipam.ErrInvalid, []string{"ip-range 10.31.0.0/25", "not inside subnet 10.30.0.0/24"}},
		{"ip-range bigger than subnet", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", SubPool: "10.30.0.0/23"}, dnpipam.ErrInvalid, []string{"ip-range 10.30.0.0/23"}},
		{"malformed ip-range", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", SubPool: "10.30.0.300/25"}, dnpipam.ErrInvalid, []string{"malformed ip-range"}},
		{"ip-range without subnet", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, SubPool: "10.30.0.0/25"}, dnpipam.ErrInvalid, []string{"without a subnet"}},
		{"IPv6 subnet for IPv4", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "fd00::/64"}, dnpipam.ErrInvalid, []string{"fd00::/64 is IPv6"}},
		{"IPv4 subnet for IPv6", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", V6: true}, dnpipam.ErrInvalid, []string{"10.30.0.0/24 is IPv4"}},
		{"subnet too small", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/31"}, dnpipam.ErrInvalid, []string{"too small"}},
		{"unknown option", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", Options: map[string]string{"colour": "blue"}}, dnpipam.ErrInvalid, []string{`unknown IPAM option "colour"`}},
		{"bad subnet-size", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Options: map[string]string{dnpipam.OptSubnetSize: "big"}}, dnpipam.ErrInvalid, []string{"subnet-size"}},
		{"subnet-size with subnet", ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: "10.30.0.0/24", Options: map[string]string{dnpipam.OptSubnetSize: "26"}}, dnpipam.ErrInvalid, []string{"subnet-size", "without --subnet"}},
		{"unknown space", ipam.RequestPoolRequest{AddressSpace: "default", Pool: "10.30.0.0/24"}, dnpipam.ErrInvalid, []string{`unknown address space "default"`}},
	}
	for _, c := range poolCases {
		_, err := a.RequestPool(context.Background(), &c.req)
		wantErr(t, err, c.kind, c.name, c.parts...)
	}
	// Docker's own options are accepted.
	id := pool(t, a, dnpipam.LocalSpace, "10.30.0.0/24", "", false, map[string]string{"com.docker.network.ipam.serial": "true"}).PoolID
	// A subnet with host bits set is the same pool, as with Docker's own IPAM.
	if again := localPool(t, a, "10.30.0.77/24", ""); again != id {
		t.Fatalf("10.30.0.77/24 gave pool %s, want %s", again, id)
	}

	addrCases := []struct {
		name  string
		pool  string
		addr  string
		opts  map[string]string
		kind  error
		parts []string
	}{
		{"unknown pool id", "nope", "", nil, dnpipam.ErrUnknownPool, []string{`"nope"`}},
		{"pool nobody requested", "dnp-local/10.99.0.0_24", "", nil, dnpipam.ErrUnknownPool, []string{"dnp-local/10.99.0.0_24"}},
		{"non-canonical pool id", "dnp-local/10.30.0.1_24", "", nil, dnpipam.ErrUnknownPool, []string{"10.30.0.1_24"}},
		{"malformed address", id, "10.30.0.x", nil, dnpipam.ErrInvalid, []string{"10.30.0.x"}},
		{"address outside subnet", id, "10.31.0.5", nil, dnpipam.ErrInvalid, []string{"10.31.0.5", "not inside subnet 10.30.0.0/24"}},
		{"network address", id, "10.30.0.0", nil, dnpipam.ErrInvalid, []string{"network address"}},
		{"broadcast address", id, "10.30.0.255", nil, dnpipam.ErrInvalid, []string{"broadcast"}},
		{"gateway outside subnet", id, "10.31.0.1", gatewayOpts, dnpipam.ErrInvalid, []string{"gateway 10.31.0.1", "not inside subnet 10.30.0.0/24"}},
		{"unknown address type", id, "", map[string]string{"RequestAddressType": "com.docker.network.vip"}, dnpipam.ErrInvalid, []string{"com.docker.network.vip"}},
		{"unknown address option", id, "", map[string]string{"flavour": "x"}, dnpipam.ErrInvalid, []string{`"flavour"`}},
	}
	for _, c := range addrCases {
		_, err := requestAddr(a, c.pool, c.addr, c.opts)
		wantErr(t, err, c.kind, c.name, c.parts...)
	}
	// None of that allocated anything.
	if n := len(allocations(t, a, id)); n != 0 {
		t.Fatalf("bad requests left %d allocations", n)
	}
}

func testCarve(t *testing.T, e *env) {
	opts := func(o *dnpipam.Options) {
		o.DefaultPools = []dnpipam.DefaultPool{
			{Base: netip.MustParsePrefix("10.210.0.0/23"), Size: 24},
			{Base: netip.MustParsePrefix("fd00:dead::/63"), Size: 64},
		}
	}
	a, b := e.host("hostA", opts), e.host("hostB", opts)
	carve := func(d *dnpipam.Driver, v6 bool, o map[string]string) (*ipam.RequestPoolResponse, error) {
		return d.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, V6: v6, Options: o})
	}
	p1, err := carve(a, false, nil)
	if err != nil || p1.Pool != "10.210.0.0/24" || p1.PoolID != "dnp-local/10.210.0.0_24" {
		t.Fatalf("first carve: %+v, %v", p1, err)
	}
	// Another host, while the first is held, gets the next subnet.
	p2, err := carve(b, false, nil)
	if err != nil || p2.Pool != "10.210.1.0/24" {
		t.Fatalf("second carve: %+v, %v", p2, err)
	}
	_, err = carve(a, false, nil)
	wantErr(t, err, dnpipam.ErrNoDefaultPool, "default range used up", "10.210.0.0/23")
	releasePool(t, a, p1.PoolID)
	// Smaller subnets on request, and explicit subnets are avoided.
	localPool(t, b, "10.210.0.0/26", "")
	p3, err := carve(a, false, map[string]string{dnpipam.OptSubnetSize: "26"})
	if err != nil || p3.Pool != "10.210.0.64/26" {
		t.Fatalf("carve /26 next to an explicit 10.210.0.0/26: %+v, %v", p3, err)
	}
	x := addr(t, a, p3.PoolID, "", nil)
	if x != "10.210.0.65/26" {
		t.Fatalf("first address of carved pool: %s", x)
	}
	// IPv6 from the IPv6 default range.
	p6, err := carve(a, true, nil)
	if err != nil || p6.Pool != "fd00:dead::/64" {
		t.Fatalf("IPv6 carve: %+v, %v", p6, err)
	}
	// Without an IPv6 default range, IPv6 needs a subnet.
	c := e.host("hostC")
	_, err = carve(c, true, nil)
	wantErr(t, err, dnpipam.ErrNoDefaultPool, "IPv6 without default range", "--subnet")
	// The built-in default is 10.210.0.0/16 in /24s: skips what is taken.
	p4, err := carve(c, false, nil)
	if err != nil || p4.Pool != "10.210.2.0/24" {
		t.Fatalf("carve from the built-in default: %+v, %v", p4, err)
	}
}

func testGateway(t *testing.T, e *env) {
	a, b, c := e.host("hostA"), e.host("hostB"), e.host("hostC")
	id := localPool(t, a, "10.25.0.0/24", "10.25.0.128/25")
	localPool(t, b, "10.25.0.0/24", "10.25.0.128/25")
	localPool(t, c, "10.25.0.0/24", "10.25.0.128/25")
	ga := addr(t, a, id, "", gatewayOpts)
	gb := addr(t, b, id, "", gatewayOpts)
	if ga != "10.25.0.1/24" || gb != ga {
		t.Fatalf("gateways: A %s, B %s; want 10.25.0.1/24 (the subnet's first address) for both", ga, gb)
	}
	// Asking for the same gateway explicitly is fine; another one is not.
	if gc := addr(t, c, id, "10.25.0.1", gatewayOpts); gc != ga {
		t.Fatalf("C gateway %s", gc)
	}
	_, err := requestAddr(c, id, "10.25.0.254", gatewayOpts)
	wantErr(t, err, dnpipam.ErrInUse, "a second, different gateway", "10.25.0.1", "10.25.0.254")
	// The gateway is never handed out and cannot be taken.
	_, err = requestAddr(a, id, "10.25.0.1", nil)
	wantErr(t, err, dnpipam.ErrInUse, "--ip of the gateway", "10.25.0.1", "gateway")

	// Released by one host, it stays reserved for the others.
	release(t, a, id, ga)
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: "10.25.0.1"})
	wantErr(t, err, dnpipam.ErrNotHeld, "A releases the gateway twice", "hostA", "hostB")
	_, err = requestAddr(a, id, "10.25.0.1", nil)
	wantErr(t, err, dnpipam.ErrInUse, "gateway still held by B and C")
	// A asks again: same gateway.
	if again := addr(t, a, id, "", gatewayOpts); again != ga {
		t.Fatalf("A's gateway after re-request: %s", again)
	}
	for _, d := range []*dnpipam.Driver{a, b, c} {
		release(t, d, id, ga)
	}
	// Now it is free: an endpoint may take it, and then a new gateway
	// request cannot.
	x := addr(t, a, id, "10.25.0.1", nil)
	_, err = requestAddr(b, id, "", gatewayOpts)
	wantErr(t, err, dnpipam.ErrInUse, "gateway address held by an endpoint", "10.25.0.1", "hostA")
	release(t, a, id, x)
	if g := addr(t, b, id, "10.25.0.126", gatewayOpts); g != "10.25.0.126/24" {
		t.Fatalf("new explicit gateway: %s", g)
	}
	// The pool remembers it: a host without --gateway gets the same.
	if g := addr(t, c, id, "", gatewayOpts); g != "10.25.0.126/24" {
		t.Fatalf("gateway for C after B set 10.25.0.126: %s", g)
	}
}

func testGatewayExplicit(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	id := localPool(t, a, "10.26.0.0/24", "")
	localPool(t, b, "10.26.0.0/24", "")
	if g := addr(t, a, id, "10.26.0.254", gatewayOpts); g != "10.26.0.254/24" {
		t.Fatalf("--gateway 10.26.0.254 gave %s", g)
	}
	if g := addr(t, b, id, "", gatewayOpts); g != "10.26.0.254/24" {
		t.Fatalf("B's gateway %s, want A's 10.26.0.254/24", g)
	}
	// Dynamic allocation starts at .1 now that .1 is not the gateway.
	if x := addr(t, b, id, "", nil); x != "10.26.0.1/24" {
		t.Fatalf("first dynamic address %s", x)
	}
}

func testIPRange(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	id := localPool(t, a, "10.27.0.0/24", "10.27.0.248/29")
	localPool(t, b, "10.27.0.0/24", "10.27.0.248/29")
	addr(t, a, id, "", gatewayOpts) // 10.27.0.1, outside the range
	var got []string
	for i := 0; i < 7; i++ {
		d := a
		if i%2 == 1 {
			d = b
		}
		got = append(got, addr(t, d, id, "", nil))
	}
	want := []string{"10.27.0.248/24", "10.27.0.249/24", "10.27.0.250/24", "10.27.0.251/24", "10.27.0.252/24", "10.27.0.253/24", "10.27.0.254/24"}
	if fmt.Sprint(sortedAddrs(got)) != fmt.Sprint(want) {
		t.Fatalf("addresses from ip-range 10.27.0.248/29: %v, want %v (never the broadcast)", got, want)
	}
	_, err := requestAddr(b, id, "", nil)
	wantErr(t, err, dnpipam.ErrExhausted, "full ip-range", "10.27.0.0/24", "10.27.0.248/29", "exhausted")
	release(t, a, id, "10.27.0.250")
	if x := addr(t, b, id, "", nil); x != "10.27.0.250/24" {
		t.Fatalf("after releasing .250 got %s", x)
	}
	// An explicit address may lie outside the ip-range but inside the
	// subnet (libnetwork reserves --aux-address that way).
	if x := addr(t, a, id, "10.27.0.5", nil); x != "10.27.0.5/24" {
		t.Fatalf("explicit address outside the range: %s", x)
	}
}

func testExplicit(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	id := localPool(t, a, "10.28.0.0/24", "")
	localPool(t, b, "10.28.0.0/24", "")
	if x := addr(t, a, id, "10.28.0.77", nil); x != "10.28.0.77/24" {
		t.Fatalf("--ip 10.28.0.77 gave %s", x)
	}
	_, err := requestAddr(b, id, "10.28.0.77", nil)
	wantErr(t, err, dnpipam.ErrInUse, "--ip of a taken address", "10.28.0.77", "hostA")
	_, err = requestAddr(a, id, "10.28.0.77", nil)
	wantErr(t, err, dnpipam.ErrInUse, "same host, same --ip twice", "10.28.0.77")
	release(t, a, id, "10.28.0.77")
	if x := addr(t, b, id, "10.28.0.77", nil); x != "10.28.0.77/24" {
		t.Fatalf("--ip after release: %s", x)
	}
	// Dynamic allocation never returns the explicit address.
	for i := 0; i < 100; i++ {
		if x := addr(t, a, id, "", nil); x == "10.28.0.77/24" {
			t.Fatalf("dynamic allocation returned the --ip address")
		}
	}
}

// Without RequireMACAddress an --aux-address is an exclusive explicit
// address: reserved, never handed out.
func testAuxExclusive(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	id := localPool(t, a, "10.29.0.0/28", "")
	addr(t, a, id, "", gatewayOpts)
	addr(t, a, id, "10.29.0.5", nil) // aux address (nil options)
	var got []string
	for {
		x, err := requestAddr(a, id, "", nil)
		if errors.Is(err, dnpipam.ErrExhausted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, x)
	}
	if len(got) != 12 {
		t.Fatalf("a /28 with gateway and one aux address gave %d addresses, want 12: %v", len(got), got)
	}
	for _, x := range got {
		if x == "10.29.0.5/28" || x == "10.29.0.1/28" {
			t.Fatalf("handed out reserved %s", x)
		}
	}
	localPool(t, b, "10.29.0.0/28", "")
	_, err := requestAddr(b, id, "10.29.0.5", nil)
	wantErr(t, err, dnpipam.ErrInUse, "second host, same aux address, without RequireMACAddress", "10.29.0.5")
}

// With RequireMACAddress, endpoint requests carry a MAC and aux requests
// do not: aux addresses are shared by every host that reserves them.
func testAuxShared(t *testing.T, e *env) {
	mac := func(o *dnpipam.Options) { o.RequireMACAddress = true }
	a, b := e.host("hostA", mac), e.host("hostB", mac)
	id := localPool(t, a, "10.31.0.0/28", "")
	localPool(t, b, "10.31.0.0/28", "")
	endpoint := map[string]string{"com.docker.network.endpoint.macaddress": "02:42:0a:1f:00:02"}
	for _, d := range []*dnpipam.Driver{a, b} {
		addr(t, d, id, "", gatewayOpts)
		if x := addr(t, d, id, "10.31.0.5", nil); x != "10.31.0.5/28" {
			t.Fatalf("aux on %s: %s", d.HostID(), x)
		}
	}
	_, err := requestAddr(a, id, "10.31.0.5", endpoint)
	wantErr(t, err, dnpipam.ErrInUse, "--ip of an aux address", "10.31.0.5", "auxiliary")
	x := addr(t, b, id, "10.31.0.9", endpoint)
	_, err = requestAddr(a, id, "10.31.0.9", endpoint)
	wantErr(t, err, dnpipam.ErrInUse, "--ip taken on another host", "10.31.0.9", "hostB")
	_, err = requestAddr(a, id, "10.31.0.9", nil)
	wantErr(t, err, dnpipam.ErrInUse, "aux address held by an endpoint", "10.31.0.9", "hostB")
	release(t, b, id, x)
	n := 0
	for {
		x, err := requestAddr(a, id, "", endpoint)
		if errors.Is(err, dnpipam.ErrExhausted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if x == "10.31.0.5/28" {
			t.Fatalf("handed out the aux address")
		}
		n++
	}
	if n != 12 {
		t.Fatalf("%d dynamic addresses, want 12", n)
	}
	release(t, a, id, "10.31.0.5")
	_, err = requestAddr(a, id, "10.31.0.5", endpoint)
	wantErr(t, err, dnpipam.ErrInUse, "aux still held by B", "hostB")
	release(t, b, id, "10.31.0.5")
	if x := addr(t, a, id, "10.31.0.5", endpoint); x != "10.31.0.5/28" {
		t.Fatalf("aux address after both released: %s", x)
	}
}

func testReleaseOnce(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	id := localPool(t, a, "10.32.0.0/24", "")
	x := addr(t, a, id, "", nil)
	rec, err := a.Release(ctxT(t, 30*time.Second), id, ipOf(x))
	if err != nil || rec.Address != ipOf(x) || rec.Host != "hostA" || rec.Kind != dnpipam.KindAddress {
		t.Fatalf("release %s: %+v, %v", x, rec, err)
	}
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: ipOf(x)})
	wantErr(t, err, dnpipam.ErrNotAllocated, "second release", ipOf(x), id)
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: "10.32.0.200"})
	wantErr(t, err, dnpipam.ErrNotAllocated, "never allocated", "10.32.0.200")
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: "10.33.0.1"})
	wantErr(t, err, dnpipam.ErrInvalid, "outside the subnet", "10.33.0.1", "10.32.0.0/24")
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: ""})
	wantErr(t, err, dnpipam.ErrInvalid, "empty address")
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: "dnp-local/10.34.0.0_24", Address: "10.34.0.1"})
	wantErr(t, err, dnpipam.ErrUnknownPool, "unknown pool", "dnp-local/10.34.0.0_24")
	err = a.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: "", Address: "10.34.0.1"})
	wantErr(t, err, dnpipam.ErrUnknownPool, "empty pool id")

	// Another host cannot release an endpoint address: after a host loss
	// the address may have gone to another host, whose it now is.
	z := ipOf(addr(t, a, id, "", nil))
	err = b.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: z})
	wantErr(t, err, dnpipam.ErrNotHeld, "release by another host", z, "hostA", "hostB")
	if _, err := a.Release(ctxT(t, 30*time.Second), id, z); err != nil {
		t.Fatalf("release %s by its host after another host tried: %v", z, err)
	}

	// Two clients of one host releasing one address at once: exactly one
	// succeeds.
	a2 := e.host("hostA")
	for i := 0; i < 10; i++ {
		y := ipOf(addr(t, a, id, "", nil))
		errs := make([]error, 2)
		var wg sync.WaitGroup
		for j, d := range []*dnpipam.Driver{a, a2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[j] = d.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: id, Address: y})
			}()
		}
		wg.Wait()
		ok := 0
		for _, err := range errs {
			switch {
			case err == nil:
				ok++
			case !errors.Is(err, dnpipam.ErrNotAllocated):
				t.Fatalf("concurrent release: %v", err)
			}
		}
		if ok != 1 {
			t.Fatalf("concurrent release of %s: %d succeeded (%v)", y, ok, errs)
		}
	}
	if n := len(allocations(t, a, id)); n != 0 {
		t.Fatalf("%d allocations left", n)
	}
}

func testIPv6(t *testing.T, e *env) {
	a, b := e.host("hostA"), e.host("hostB")
	res := pool(t, a, dnpipam.LocalSpace, "fd00:1::/64", "", true, nil)
	if res.PoolID != "dnp-local/fd00:1::_64" || res.Pool != "fd00:1::/64" {
		t.Fatalf("IPv6 pool %+v", res)
	}
	id := res.PoolID
	localPool(t, b, "fd00:1::/64", "")
	if g := addr(t, a, id, "", gatewayOpts); g != "fd00:1::1/64" {
		t.Fatalf("IPv6 gateway %s", g)
	}
	if g := addr(t, b, id, "", gatewayOpts); g != "fd00:1::1/64" {
		t.Fatalf("IPv6 gateway on B %s", g)
	}
	if x := addr(t, a, id, "", nil); x != "fd00:1::2/64" {
		t.Fatalf("first IPv6 address %s", x)
	}
	if x := addr(t, b, id, "", nil); x != "fd00:1::3/64" {
		t.Fatalf("second IPv6 address (other host) %s", x)
	}
	if x := addr(t, a, id, "fd00:1::ffff:ffff:ffff:ffff", nil); x != "fd00:1::ffff:ffff:ffff:ffff/64" {
		t.Fatalf("last IPv6 address (no broadcast in IPv6): %s", x)
	}
	_, err := requestAddr(b, id, "fd00:1:0:0::2", nil)
	wantErr(t, err, dnpipam.ErrInUse, "IPv6 --ip taken (other spelling)", "fd00:1::2")
	release(t, a, id, "fd00:1::0002")
	_, err = requestAddr(a, id, "fd00:2::1", nil)
	wantErr(t, err, dnpipam.ErrInvalid, "IPv6 outside subnet", "fd00:2::1")
	// An IPv6 ip-range.
	rid := localPool(t, a, "fd00:1::/64", "fd00:1::100/120")
	if x := addr(t, a, rid, "", nil); x != "fd00:1::100/64" {
		t.Fatalf("first address of IPv6 ip-range %s", x)
	}
	if n := len(allocations(t, a, id)); n != 4 {
		t.Fatalf("%d allocations, want 4 (gateway, ::3, ::ffff..., ::100)", n)
	}
}

func testAttach(t *testing.T, e *env) {
	a := e.host("hostA")
	s := e.b.Open(t, e.ns)
	id := localPool(t, a, "10.35.0.0/24", "")
	x := ipOf(addr(t, a, id, "", nil))
	ctx := ctxT(t, 30*time.Second)
	if err := a.AttachEndpoint(ctx, id, x, "ep1", store.Create("test/endpoints/ep1", []byte(x))); err != nil {
		t.Fatalf("attach: %v", err)
	}
	if kv, err := s.Get(ctx, "test/endpoints/ep1"); err != nil || string(kv.Value) != x {
		t.Fatalf("endpoint record: %+v, %v", kv, err)
	}
	list := allocations(t, a, id)
	if len(list) != 1 || list[0].Endpoint != "ep1" || list[0].Host != "hostA" {
		t.Fatalf("allocations after attach: %+v", list)
	}
	// Idempotent for the same endpoint; another endpoint is refused.
	if err := a.AttachEndpoint(ctx, id, x, "ep1"); err != nil {
		t.Fatalf("attach again: %v", err)
	}
	err := a.AttachEndpoint(ctx, id, x, "ep2")
	wantErr(t, err, dnpipam.ErrInUse, "attach a second endpoint", "ep1", "ep2")
	// When the caller's operation fails, nothing is written.
	y := ipOf(addr(t, a, id, "", nil))
	err = a.AttachEndpoint(ctx, id, y, "ep3", store.Create("test/endpoints/ep1", []byte("dup")))
	if !errors.Is(err, store.ErrConflict) {
		t.Fatalf("attach with a failing extra op: %v, want a conflict", err)
	}
	for _, r := range allocations(t, a, id) {
		if r.Address == y && r.Endpoint != "" {
			t.Fatalf("failed attach still recorded endpoint %q", r.Endpoint)
		}
	}
	err = a.AttachEndpoint(ctx, id, "10.35.0.99", "ep4")
	wantErr(t, err, dnpipam.ErrNotAllocated, "attach to a free address", "10.35.0.99")
	// Release hands the endpoint back.
	rec, err := a.Release(ctx, id, x)
	if err != nil || rec.Endpoint != "ep1" {
		t.Fatalf("release: %+v, %v; want endpoint ep1", rec, err)
	}
}

// One allocation in a /16 is one transaction: no list, no read of the
// pool. That is what lets a /16 scale.
func testScales(t *testing.T, e *env) {
	cs := &countingStore{Store: e.b.Open(t, e.ns), calls: map[string]int{}}
	a := dnpipam.New(cs, dnpipam.Options{HostID: "hostA", Logger: quietLogger()})
	id := localPool(t, a, "10.36.0.0/16", "")
	addr(t, a, id, "", nil) // warm up: reads the hint once
	before := cs.snapshot()
	const n = 200
	for i := 0; i < n; i++ {
		addr(t, a, id, "", nil)
	}
	after := cs.snapshot()
	total := 0
	for op, c := range after {
		total += c - before[op]
	}
	if after["list"] != before["list"] || total != n || after["txn"]-before["txn"] != n {
		t.Fatalf("%d allocations made %d store calls (before %v, after %v); want one transaction each", n, total, before, after)
	}
	// A release is a read and a delete.
	before = cs.snapshot()
	release(t, a, id, "10.36.0.7")
	after = cs.snapshot()
	if after["get"]-before["get"] != 1 || after["txn"]-before["txn"] != 1 || after["list"] != before["list"] {
		t.Fatalf("release made calls %v -> %v", before, after)
	}
}

// A host that restarts (fresh driver) or another host finds the holes
// left behind once the range wrapped.
func testHoles(t *testing.T, e *env) {
	a := e.host("hostA")
	id := localPool(t, a, "10.37.0.0/27", "")
	for i := 0; i < 30; i++ {
		addr(t, a, id, "", nil)
	}
	_, err := requestAddr(a, id, "", nil)
	wantErr(t, err, dnpipam.ErrExhausted, "full /27", "10.37.0.0/27", "30")
	holes := []string{"10.37.0.3", "10.37.0.17", "10.37.0.29"}
	for _, h := range holes {
		release(t, a, id, h)
	}
	b := e.host("hostB")
	localPool(t, b, "10.37.0.0/27", "")
	var got []string
	for range holes {
		got = append(got, ipOf(addr(t, b, id, "", nil)))
	}
	if fmt.Sprint(sortedAddrs(got)) != fmt.Sprint(holes) {
		t.Fatalf("filled %v, want the holes %v", got, holes)
	}
	_, err = requestAddr(b, id, "", nil)
	wantErr(t, err, dnpipam.ErrExhausted, "full again")
}

// Addresses still allocated when the last host releases a pool leaked;
// they stay reserved (never handed out twice) and visible for accounting,
// and a gateway left that way is taken up again by the next pool.
func testLeftovers(t *testing.T, e *env) {
	a := e.host("hostA")
	id := localPool(t, a, "10.38.0.0/29", "")
	g := addr(t, a, id, "", gatewayOpts)
	x := addr(t, a, id, "", nil)
	releasePool(t, a, id) // leaks g and x
	b := e.host("hostB")
	localPool(t, b, "10.38.0.0/29", "")
	if g2 := addr(t, b, id, "", gatewayOpts); g2 != g {
		t.Fatalf("gateway after re-creating the pool: %s, want the leftover %s", g2, g)
	}
	var got []string
	for {
		y, err := requestAddr(b, id, "", nil)
		if errors.Is(err, dnpipam.ErrExhausted) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if y == x {
			t.Fatalf("leaked %s handed out again", x)
		}
		got = append(got, y)
	}
	if len(got) != 4 {
		t.Fatalf("a /29 with gateway and one leaked address gave %d addresses, want 4: %v", len(got), got)
	}
	found := false
	for _, r := range allocations(t, b, id) {
		if r.Address == ipOf(x) && r.Host == "hostA" {
			found = true
		}
	}
	if !found {
		t.Fatalf("leaked %s is not listed under hostA", x)
	}
	// Its holder can still release it.
	release(t, a, id, x)
}
