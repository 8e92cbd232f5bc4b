package overlay_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

func TestEnsureNetworkIsIdempotentAndRepairs(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	cfg := overlay.NetworkConfig{ID: "net1", VNI: 4242, LocalIP: a.ip}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.NetNS); err != nil {
		t.Fatalf("namespace file: %v", err)
	}
	if ids, _ := a.host.ListNetworks(); !slices.Equal(ids, []string{"net1"}) {
		t.Fatalf("ListNetworks = %v, want [net1]", ids)
	}
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	if st.VNI != 4242 || st.LocalIP != a.ip || st.Port != 4789 || st.Learning {
		t.Fatalf("vxlan: VNI %d local %s port %d learning %v; want 4242 %s 4789 false", st.VNI, st.LocalIP, st.Port, st.Learning, a.ip)
	}
	vx, _ := link(t, a.ovName("net1"), "vxlan0")
	br, _ := link(t, a.ovName("net1"), "br0")
	if vx.Master != "br0" || !vx.up() || !br.up() {
		t.Fatalf("vxlan0 master %q up %v, br0 up %v; want br0, true, true", vx.Master, vx.up(), br.up())
	}
	// The VXLAN socket is in the host namespace, not the overlay one.
	if out := a.ns.MustExec("ss", "-Hlun"); !strings.Contains(out, ":4789") {
		t.Fatalf("no UDP socket on 4789 in the host namespace: %q", out)
	}
	if out := mustRun(t, "ip", "netns", "exec", a.ovName("net1"), "ss", "-Hlun"); strings.Contains(out, ":4789") {
		t.Fatalf("UDP socket on 4789 inside the overlay namespace: %q", out)
	}

	// Again, and from a fresh Host as after a plugin restart: same devices.
	if _, err := a.host.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	restarted := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix}
	found, err := restarted.Network("net1")
	if err != nil {
		t.Fatal(err)
	}
	if found.VNI != 4242 || found.LocalIP != a.ip || found.MTU != n.MTU {
		t.Fatalf("Network() = %+v, want VNI 4242 local %s MTU %d", found, a.ip, n.MTU)
	}
	if _, err := restarted.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	if again, _ := link(t, a.ovName("net1"), "vxlan0"); again.Index != vx.Index {
		t.Fatalf("vxlan0 was recreated (index %d -> %d)", vx.Index, again.Index)
	}

	// Break things; EnsureNetwork puts them right without recreating.
	a.ovIP(t, "net1", "link", "set", "vxlan0", "nomaster")
	a.ovIP(t, "net1", "link", "set", "br0", "down")
	a.ovIP(t, "net1", "link", "set", "br0", "mtu", "1300")
	if _, err := restarted.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	vx2, _ := link(t, a.ovName("net1"), "vxlan0")
	br2, _ := link(t, a.ovName("net1"), "br0")
	if vx2.Index != vx.Index || vx2.Master != "br0" || !br2.up() || br2.MTU != n.MTU {
		t.Fatalf("after repair: vxlan0 index %d master %q, br0 up %v mtu %d", vx2.Index, vx2.Master, br2.up(), br2.MTU)
	}
	brPort := mustRun(t, "bridge", "-n", a.ovName("net1"), "-d", "link", "show", "dev", "vxlan0")
	if !strings.Contains(brPort, "learning off") || !strings.Contains(brPort, "neigh_suppress on") {
		t.Fatalf("vxlan0 bridge port flags: %s", brPort)
	}

	// A different VNI replaces the device.
	cfg.VNI = 4343
	if _, err := a.host.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	if st, _ := n.State(); st.VNI != 4343 {
		t.Fatalf("VNI after change = %d, want 4343", st.VNI)
	}

	// A second network cannot take a VNI already used on this host.
	_, err = a.host.EnsureNetwork(overlay.NetworkConfig{ID: "net2", VNI: 4343, LocalIP: a.ip})
	if err == nil || !strings.Contains(err.Error(), "VNI 4343 is already used") {
		t.Fatalf("duplicate VNI: err = %v, want 'VNI 4343 is already used'", err)
	}
	if ids, _ := a.host.ListNetworks(); !slices.Equal(ids, []string{"net1"}) {
		t.Fatalf("failed create left a namespace: ListNetworks = %v, want [net1]", ids)
	}
}

func TestNetworkConfigErrors(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	for _, tc := range []struct {
		name string
		cfg  overlay.NetworkConfig
		want string
	}{
		{"bad id", overlay.NetworkConfig{ID: "../x", VNI: 1, LocalIP: a.ip}, "invalid network id"},
		{"vni 0", overlay.NetworkConfig{ID: "n", VNI: 0, LocalIP: a.ip}, "VNI 0 out of range"},
		{"vni too big", overlay.NetworkConfig{ID: "n", VNI: 1 << 24, LocalIP: a.ip}, "out of range"},
		{"no local ip", overlay.NetworkConfig{ID: "n", VNI: 1}, "invalid local"},
		{"local ip not here", overlay.NetworkConfig{ID: "n", VNI: 1, LocalIP: netip.MustParseAddr("192.168.251.9")}, "on no device"},
		{"unknown encap", overlay.NetworkConfig{ID: "n", VNI: 1, LocalIP: a.ip, Encap: "ipip"}, `unknown encap "ipip"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := a.host.EnsureNetwork(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
	if ids, _ := a.host.ListNetworks(); len(ids) != 0 {
		t.Fatalf("failed configs left namespaces: %v", ids)
	}
}

func TestMTU(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	a.ns.IP("link", "set", "ul0", "mtu", "1400")

	n, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "auto", VNI: 10, LocalIP: a.ip})
	if err != nil {
		t.Fatal(err)
	}
	if n.MTU != 1350 {
		t.Fatalf("MTU = %d, want underlay 1400 - 50", n.MTU)
	}
	hostIf, err := n.AddEndpoint(overlay.Endpoint{ID: "ep1234567890", MAC: mac(t, "02:00:00:00:01:01")})
	if err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{"br0", "vxlan0", "dnpep123456-p"} {
		if l, _ := link(t, a.ovName("auto"), dev); l.MTU != 1350 {
			t.Errorf("%s MTU %d, want 1350", dev, l.MTU)
		}
	}
	if l, _ := link(t, a.ns.Name, hostIf); l.MTU != 1350 {
		t.Errorf("host end %s MTU %d, want 1350", hostIf, l.MTU)
	}

	n2, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "fixed", VNI: 11, LocalIP: a.ip, MTU: 1280})
	if err != nil {
		t.Fatal(err)
	}
	if l, _ := link(t, a.ovName("fixed"), "vxlan0"); n2.MTU != 1280 || l.MTU != 1280 {
		t.Fatalf("given MTU: network %d, vxlan0 %d; want 1280", n2.MTU, l.MTU)
	}
}

func TestEndpoints(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	n, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 20, LocalIP: a.ip})
	if err != nil {
		t.Fatal(err)
	}
	ep := overlay.Endpoint{ID: "abcdef0123456789", MAC: mac(t, "02:00:00:00:02:01")}
	name, err := n.AddEndpoint(ep)
	if err != nil {
		t.Fatal(err)
	}
	if name != "dnpabcdef01-h" || name != overlay.HostIfName(ep.ID) {
		t.Fatalf("host interface %q, want dnpabcdef01-h", name)
	}
	hostEnd, ok := link(t, a.ns.Name, name)
	if !ok || hostEnd.Address != "02:00:00:00:02:01" {
		t.Fatalf("host end %s: exists %v, MAC %q; want 02:00:00:00:02:01", name, ok, hostEnd.Address)
	}
	port, ok := link(t, a.ovName("net1"), "dnpabcdef01-p")
	if !ok || port.Master != "br0" || !port.up() {
		t.Fatalf("bridge port: exists %v master %q up %v", ok, port.Master, port.up())
	}

	// Idempotent, and it repairs the MAC.
	a.ns.IP("link", "set", name, "address", "02:00:00:00:02:99")
	if again, err := n.AddEndpoint(ep); err != nil || again != name {
		t.Fatalf("second AddEndpoint = %q, %v", again, err)
	}
	if l, _ := link(t, a.ns.Name, name); l.Index != hostEnd.Index || l.Address != "02:00:00:00:02:01" {
		t.Fatalf("after second AddEndpoint: index %d (was %d), MAC %s", l.Index, hostEnd.Index, l.Address)
	}

	// Still fine once libnetwork has moved the host end away.
	c := container(t, a, name)
	if again, err := n.AddEndpoint(ep); err != nil || again != name {
		t.Fatalf("AddEndpoint after move = %q, %v", again, err)
	}

	// An id sharing the first 8 characters is refused, not confused.
	if _, err := n.AddEndpoint(overlay.Endpoint{ID: "abcdef01ffff", MAC: mac(t, "02:00:00:00:02:02")}); err == nil || !strings.Contains(err.Error(), "belongs to endpoint abcdef0123456789") {
		t.Fatalf("colliding id: err = %v", err)
	}
	if err := n.RemoveEndpoint("abcdef01ffff"); err == nil {
		t.Fatal("RemoveEndpoint of a colliding id removed another endpoint's veth")
	}

	// Remove deletes both ends, wherever they are; twice is fine.
	if err := n.RemoveEndpoint(ep.ID); err != nil {
		t.Fatal(err)
	}
	if _, ok := link(t, c.Name, "eth0"); ok {
		t.Fatal("container still has eth0 after RemoveEndpoint")
	}
	if _, ok := link(t, a.ovName("net1"), "dnpabcdef01-p"); ok {
		t.Fatal("bridge port still there after RemoveEndpoint")
	}
	if err := n.RemoveEndpoint(ep.ID); err != nil {
		t.Fatalf("second RemoveEndpoint: %v", err)
	}
}

func TestSetPeersReconciles(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	n, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 30, LocalIP: a.ip})
	if err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("192.168.250.11")
	y := netip.MustParseAddr("192.168.250.12")
	z := netip.MustParseAddr("192.168.250.13")
	p1 := overlay.Peer{HostIP: x, MAC: mac(t, "02:00:00:00:03:01"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.2"), netip.MustParseAddr("fd00:30::2")}}
	p2 := overlay.Peer{HostIP: y, MAC: mac(t, "02:00:00:00:03:02"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.3")}}
	self := overlay.Peer{HostIP: a.ip, MAC: mac(t, "02:00:00:00:03:03"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.4")}}

	// p1: fdb+bridge+2 neigh; p2: fdb+bridge+neigh; zero entries for x, y;
	// nothing for this host's own endpoint or address.
	changes, err := n.SetPeers([]overlay.Peer{p1, p2, self}, []netip.Addr{a.ip, x})
	if err != nil {
		t.Fatal(err)
	}
	if changes != 9 {
		t.Fatalf("first SetPeers: %d changes, want 9", changes)
	}
	wantFDB := []string{
		"00:00:00:00:00:00 dst 192.168.250.11 self permanent",
		"00:00:00:00:00:00 dst 192.168.250.12 self permanent",
		"02:00:00:00:03:01 dst 192.168.250.11 self permanent",
		"02:00:00:00:03:02 dst 192.168.250.12 self permanent",
	}
	if got := fdbSelf(t, n); !slices.Equal(got, wantFDB) {
		t.Fatalf("FDB:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantFDB, "\n"))
	}
	wantNeigh := []string{
		"10.30.0.2 lladdr 02:00:00:00:03:01 permanent",
		"10.30.0.3 lladdr 02:00:00:00:03:02 permanent",
		"fd00:30::2 lladdr 02:00:00:00:03:01 permanent",
	}
	if got := permanentNeigh(t, n); !slices.Equal(got, wantNeigh) {
		t.Fatalf("neighbours:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantNeigh, "\n"))
	}
	bridgeFDB := mustRun(t, "bridge", "-n", a.ovName("net1"), "fdb", "show", "dev", "vxlan0")
	for _, m := range []string{"02:00:00:00:03:01 master br0 static", "02:00:00:00:03:02 master br0 static"} {
		if !strings.Contains(bridgeFDB, m) {
			t.Fatalf("bridge fdb lacks %q:\n%s", m, bridgeFDB)
		}
	}

	// Nothing to do the second time.
	if changes, err := n.SetPeers([]overlay.Peer{p1, p2, self}, []netip.Addr{a.ip, x}); err != nil || changes != 0 {
		t.Fatalf("repeated SetPeers: %d changes, %v; want 0", changes, err)
	}

	// p1 moves to z, p2 goes away: fdb p1@x, p2@y, 0@y go, p1@z and 0@z
	// come (0@x stays: x is still listed), bridge p2 and neigh p2 go.
	changes, err = n.SetPeers([]overlay.Peer{{HostIP: z, MAC: p1.MAC, IPs: p1.IPs}}, []netip.Addr{x})
	if err != nil {
		t.Fatal(err)
	}
	if changes != 7 {
		t.Fatalf("SetPeers after move: %d changes, want 7", changes)
	}
	wantFDB = []string{
		"00:00:00:00:00:00 dst 192.168.250.11 self permanent",
		"00:00:00:00:00:00 dst 192.168.250.13 self permanent",
		"02:00:00:00:03:01 dst 192.168.250.13 self permanent",
	}
	if got := fdbSelf(t, n); !slices.Equal(got, wantFDB) {
		t.Fatalf("FDB:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantFDB, "\n"))
	}
	if got := permanentNeigh(t, n); !slices.Equal(got, []string{wantNeigh[0], wantNeigh[2]}) {
		t.Fatalf("neighbours after p2 left: %v", got)
	}

	// Contradictions are refused before anything changes.
	bad := [][]overlay.Peer{
		{{HostIP: x, MAC: p1.MAC}, {HostIP: y, MAC: p1.MAC}},
		{{HostIP: netip.MustParseAddr("fd00::1"), MAC: p1.MAC}},
		{p1, {HostIP: y, MAC: p2.MAC, IPs: p1.IPs[:1]}},
		{{HostIP: x, MAC: mac(t, "01:00:5e:00:00:01")}},
	}
	for i, peers := range bad {
		if _, err := n.SetPeers(peers, nil); err == nil {
			t.Errorf("bad peers %d: no error", i)
		}
	}
	if got := fdbSelf(t, n); !slices.Equal(got, wantFDB) {
		t.Fatalf("refused SetPeers changed the FDB: %v", got)
	}

	// Empty: everything goes.
	if _, err := n.SetPeers(nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := fdbSelf(t, n); len(got) != 0 {
		t.Fatalf("FDB after SetPeers(nil): %v", got)
	}
	if got := permanentNeigh(t, n); len(got) != 0 {
		t.Fatalf("neighbours after SetPeers(nil): %v", got)
	}
}

// TestTwoHostsPing is the data plane end to end: two hosts, one container
// each, reachable over VXLAN through static entries only.
func TestTwoHostsPing(t *testing.T) {
	hs := newHosts(t, 2)
	a, b := hs[0], hs[1]
	gw := []netip.Prefix{netip.MustParsePrefix("10.40.0.1/24"), netip.MustParsePrefix("fd00:40::1/64")}
	nets := map[*testHost]*overlay.Network{}
	for _, h := range hs {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 40, LocalIP: h.ip, Gateways: gw})
		if err != nil {
			t.Fatal(err)
		}
		nets[h] = n
	}
	epA := overlay.Peer{HostIP: a.ip, MAC: mac(t, "02:00:00:00:04:0a"), IPs: []netip.Addr{netip.MustParseAddr("10.40.0.2"), netip.MustParseAddr("fd00:40::2")}}
	epB := overlay.Peer{HostIP: b.ip, MAC: mac(t, "02:00:00:00:04:0b"), IPs: []netip.Addr{netip.MustParseAddr("10.40.0.3"), netip.MustParseAddr("fd00:40::3")}}

	ifA, err := nets[a].AddEndpoint(overlay.Endpoint{ID: "endpointa", MAC: epA.MAC})
	if err != nil {
		t.Fatal(err)
	}
	ifB, err := nets[b].AddEndpoint(overlay.Endpoint{ID: "endpointb", MAC: epB.MAC})
	if err != nil {
		t.Fatal(err)
	}
	cA := container(t, a, ifA, "10.40.0.2/24", "fd00:40::2/64")
	cB := container(t, b, ifB, "10.40.0.3/24", "fd00:40::3/64")

	// No entries yet: nothing crosses.
	mustNotPing(t, cA, "10.40.0.3")

	all := []overlay.Peer{epA, epB}
	hosts := []netip.Addr{a.ip, b.ip}
	for _, h := range hs {
		changes, err := nets[h].SetPeers(all, hosts)
		if err != nil {
			t.Fatal(err)
		}
		if changes != 5 { // zero fdb, peer fdb, bridge fdb, 2 neighbours
			t.Fatalf("SetPeers: %d changes, want 5", changes)
		}
	}
	mustPing(t, cA, "10.40.0.3")
	mustPing(t, cB, "10.40.0.2")
	mustPing(t, cA, "fd00:40::3")
	mustPing(t, cB, "fd00:40::2")

	// The gateway is on every host's bridge and answered locally.
	mustPing(t, cA, "10.40.0.1")
	mustPing(t, cA, "fd00:40::1")
	brA, _ := link(t, a.ovName("net1"), "br0")
	if out := cA.IP("neigh", "show", "10.40.0.1"); !strings.Contains(out, brA.Address) {
		t.Fatalf("container A resolved the gateway to %q, want host A's bridge %s", out, brA.Address)
	}

	// Learning is off: after all that traffic the FDB holds exactly what
	// SetPeers put there, nothing learned.
	st, err := nets[a].State()
	if err != nil {
		t.Fatal(err)
	}
	if st.Learning {
		t.Fatal("VXLAN learning is on")
	}
	var got []string
	for _, e := range st.FDB {
		if e.State != "permanent" || e.Self {
			got = append(got, e.String())
		}
	}
	want := []string{
		"00:00:00:00:00:00 dst 192.168.250.2 self permanent",
		"02:00:00:00:04:0b dst 192.168.250.2 self permanent",
		"02:00:00:00:04:0b master br0 static",
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("FDB of vxlan0 on host A:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// ARP and ND for remote addresses are answered on the local host: with
	// the broadcast (all-zero) entries gone and caches flushed, containers
	// still resolve each other.
	for _, h := range []*testHost{a, b} {
		other := b.ip
		if h == b {
			other = a.ip
		}
		mustRun(t, "bridge", "-n", h.ovName("net1"), "fdb", "del", "00:00:00:00:00:00", "dev", "vxlan0", "dst", other.String())
	}
	cA.IP("neigh", "flush", "dev", "eth0")
	cB.IP("neigh", "flush", "dev", "eth0")
	mustPing(t, cA, "10.40.0.3")
	mustPing(t, cA, "fd00:40::3")
	for _, h := range hs {
		if changes, err := nets[h].SetPeers(all, hosts); err != nil || changes != 1 {
			t.Fatalf("SetPeers after losing the zero entry: %d changes, %v; want 1", changes, err)
		}
	}

	// B leaves: SetPeers removes its endpoint and host from A, and A's
	// container can no longer reach it, even with B's MAC cached.
	changes, err := nets[a].SetPeers([]overlay.Peer{epA}, []netip.Addr{a.ip})
	if err != nil {
		t.Fatal(err)
	}
	if changes != 5 {
		t.Fatalf("removing B: %d changes, want 5", changes)
	}
	if got := fdbSelf(t, nets[a]); len(got) != 0 {
		t.Fatalf("FDB on A after B left: %v", got)
	}
	mustNotPing(t, cA, "10.40.0.3")
	mustNotPing(t, cA, "fd00:40::3")

	// And back.
	if _, err := nets[a].SetPeers(all, hosts); err != nil {
		t.Fatal(err)
	}
	mustPing(t, cA, "10.40.0.3")
}

func TestDeleteNetworkLeavesNothing(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	cfg := overlay.NetworkConfig{ID: "net1", VNI: 50, LocalIP: a.ip, Gateways: []netip.Prefix{netip.MustParsePrefix("10.50.0.1/24")}}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	kept, err := n.AddEndpoint(overlay.Endpoint{ID: "keptinhost", MAC: mac(t, "02:00:00:00:05:01")})
	if err != nil {
		t.Fatal(err)
	}
	moved, err := n.AddEndpoint(overlay.Endpoint{ID: "moved000", MAC: mac(t, "02:00:00:00:05:02")})
	if err != nil {
		t.Fatal(err)
	}
	c := container(t, a, moved, "10.50.0.2/24")
	if _, err := n.SetPeers([]overlay.Peer{{HostIP: netip.MustParseAddr("192.168.250.9"), MAC: mac(t, "02:00:00:00:05:09")}}, nil); err != nil {
		t.Fatal(err)
	}

	if err := a.host.DeleteNetwork("net1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(n.NetNS); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("namespace file still there: %v", err)
	}
	if ids, _ := a.host.ListNetworks(); len(ids) != 0 {
		t.Fatalf("ListNetworks after delete: %v", ids)
	}
	if _, ok := link(t, a.ns.Name, kept); ok {
		t.Fatalf("host end %s still in the host namespace", kept)
	}
	if _, ok := link(t, c.Name, "eth0"); ok {
		t.Fatal("container still has its interface")
	}
	if out := a.ns.MustExec("ss", "-Hlun"); strings.Contains(out, ":4789") {
		t.Fatalf("VXLAN socket still open in the host namespace: %q", out)
	}
	if _, err := a.host.Network("net1"); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("Network after delete: %v, want ErrNotFound", err)
	}
	// Idempotent, and the calls that follow a delete are harmless.
	if err := a.host.DeleteNetwork("net1"); err != nil {
		t.Fatalf("second DeleteNetwork: %v", err)
	}
	if err := n.RemoveEndpoint("keptinhost"); err != nil {
		t.Fatalf("RemoveEndpoint on deleted network: %v", err)
	}
	// The VNI is free again at once.
	if _, err := a.host.EnsureNetwork(cfg); err != nil {
		t.Fatalf("re-create after delete: %v", err)
	}
}

func TestGRE(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	if err := overlay.Available("vxlan"); err != nil {
		t.Fatalf("Available(vxlan): %v", err)
	}
	err := overlay.Available("gre")
	if err == nil {
		t.Skip("SKIP: this kernel has gretap, so the missing-gretap error cannot be shown here; GRE networks are not implemented (EnsureNetwork refuses encap=gre)")
	}
	if !errors.Is(err, overlay.ErrNoGRETap) {
		t.Fatalf("Available(gre) = %v, want ErrNoGRETap", err)
	}
	_, err = a.host.EnsureNetwork(overlay.NetworkConfig{ID: "gre1", VNI: 60, LocalIP: a.ip, Encap: "gre"})
	if !errors.Is(err, overlay.ErrNoGRETap) || !strings.Contains(err.Error(), "kernel has no GRE tap support (gretap); use encap=vxlan") {
		t.Fatalf("EnsureNetwork(encap=gre) = %v, want the clear gretap error", err)
	}
	if ids, _ := a.host.ListNetworks(); len(ids) != 0 {
		t.Fatalf("failed gre network left namespaces: %v", ids)
	}
}

// TestIPv6Underlay runs the overlay over an IPv6-only underlay: VXLAN
// overhead is 70 there, and FDB destinations are IPv6.
func TestIPv6Underlay(t *testing.T) {
	hs := newHosts(t, 2)
	for i, h := range hs {
		h.ip = netip.AddrFrom16([16]byte{0xfd, 0, 2, 0x50, 15: byte(i + 1)})
		h.ns.IP("addr", "add", h.ip.String()+"/64", "dev", "ul0", "nodad")
	}
	var nets []*overlay.Network
	var peers []overlay.Peer
	var conts []*testenv.NetNS
	for i, h := range hs {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "v6", VNI: 70, LocalIP: h.ip})
		if err != nil {
			t.Fatal(err)
		}
		if n.MTU != 1430 {
			t.Fatalf("MTU over IPv6 underlay = %d, want 1500 - 70", n.MTU)
		}
		m := mac(t, fmt.Sprintf("02:00:00:00:07:%02x", i+1))
		ifName, err := n.AddEndpoint(overlay.Endpoint{ID: fmt.Sprintf("v6ep%d", i+1), MAC: m})
		if err != nil {
			t.Fatal(err)
		}
		ip := fmt.Sprintf("10.70.0.%d", i+2)
		conts = append(conts, container(t, h, ifName, ip+"/24"))
		nets = append(nets, n)
		peers = append(peers, overlay.Peer{HostIP: h.ip, MAC: m, IPs: []netip.Addr{netip.MustParseAddr(ip)}})
	}
	for _, n := range nets {
		if _, err := n.SetPeers(peers, nil); err != nil {
			t.Fatal(err)
		}
	}
	if got := fdbSelf(t, nets[0]); !slices.Contains(got, "02:00:00:00:07:02 dst fd00:250::2 self permanent") {
		t.Fatalf("FDB on host 1: %v", got)
	}
	mustPing(t, conts[0], "10.70.0.3")
	mustPing(t, conts[1], "10.70.0.2")
}
