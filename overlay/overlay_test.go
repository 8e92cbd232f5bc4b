package overlay_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

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

	if max, err := a.host.MaxMTU(a.ip, "", false); err != nil || max != 1350 {
		t.Fatalf("MaxMTU = %d, %v; want underlay 1400 - 50", max, err)
	}
	if max, err := a.host.MaxMTU(a.ip, overlay.EncapGRE, false); err != nil || max != 1358 {
		t.Fatalf("MaxMTU for gre = %d, %v; want underlay 1400 - 42", max, err)
	}
	if max, err := a.host.MaxMTU(a.ip, "", true); err != nil || max != 1350-overlay.EncryptionOverhead {
		t.Fatalf("MaxMTU encrypted = %d, %v; want underlay 1400 - 50 - %d", max, err, overlay.EncryptionOverhead)
	}
	if _, err := a.host.MaxMTU(netip.MustParseAddr("192.0.2.99"), "", false); err == nil {
		t.Fatal("MaxMTU of an address on no device: no error")
	}
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

	// Disable takes the bridge port down (twice is fine); the container
	// keeps its interface, without carrier.
	for range 2 {
		if err := n.DisableEndpoint(ep.ID); err != nil {
			t.Fatal(err)
		}
	}
	if port, ok := link(t, a.ovName("net1"), "dnpabcdef01-p"); !ok || port.up() {
		t.Fatalf("bridge port after DisableEndpoint: exists %v, up %v; want it there and down", ok, port.up())
	}
	if eth, ok := link(t, c.Name, "eth0"); !ok || !strings.Contains(strings.Join(eth.Flags, ","), "NO-CARRIER") {
		t.Fatalf("container interface after DisableEndpoint: exists %v, flags %v; want NO-CARRIER", ok, eth.Flags)
	}
	if err := n.DisableEndpoint("0123456789ab"); err != nil {
		t.Fatalf("DisableEndpoint of a missing endpoint: %v", err)
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
	forEachEncap(t, testSetPeersReconciles)
}

func testSetPeersReconciles(t *testing.T, encap string) {
	hs := newHosts(t, 1)
	a := hs[0]
	gre := encap == overlay.EncapGRE
	n, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 30, Encap: encap, LocalIP: a.ip})
	if err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("192.168.250.11")
	y := netip.MustParseAddr("192.168.250.12")
	z := netip.MustParseAddr("192.168.250.13")
	p1 := overlay.Peer{HostIP: x, MAC: mac(t, "02:00:00:00:03:01"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.2"), netip.MustParseAddr("fd00:30::2")}}
	p2 := overlay.Peer{HostIP: y, MAC: mac(t, "02:00:00:00:03:02"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.3")}}
	self := overlay.Peer{HostIP: a.ip, MAC: mac(t, "02:00:00:00:03:03"), IPs: []netip.Addr{netip.MustParseAddr("10.30.0.4")}}

	// VXLAN, p1: fdb+bridge+2 neigh; p2: fdb+bridge+neigh; zero entries
	// for x, y. GRE: tunnels to x and y, bridge entries for p1 and p2, 3
	// neighbours. Nothing for this host's own endpoint or address.
	changes, err := n.SetPeers([]overlay.Peer{p1, p2, self}, []netip.Addr{a.ip, x})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[bool]int{false: 9, true: 7}[gre]; changes != want {
		t.Fatalf("first SetPeers: %d changes, want %d", changes, want)
	}
	var wantFDB []string
	if gre {
		ts := tunnels(t, n)
		if len(ts) != 2 {
			t.Fatalf("tunnels: %v, want to %s and %s", ts, x, y)
		}
		checkTunnel(t, a, "net1", ts[x], a.ip, x, 30)
		checkTunnel(t, a, "net1", ts[y], a.ip, y, 30)
		wantFDB = []string{
			"02:00:00:00:03:01 dst 192.168.250.11 master br0 static",
			"02:00:00:00:03:02 dst 192.168.250.12 master br0 static",
		}
		if got := staticFDB(t, n); !slices.Equal(got, wantFDB) {
			t.Fatalf("bridge FDB:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantFDB, "\n"))
		}
		// As iproute2 shows it: each MAC on its host's tunnel port.
		for _, m := range []struct {
			mac  string
			host netip.Addr
		}{{"02:00:00:00:03:01", x}, {"02:00:00:00:03:02", y}} {
			out := mustRun(t, "bridge", "-n", a.ovName("net1"), "fdb", "show", "dev", ts[m.host].Name)
			if !strings.Contains(out, m.mac+" master br0 static") {
				t.Fatalf("bridge fdb show dev %s (tunnel to %s) lacks %s:\n%s", ts[m.host].Name, m.host, m.mac, out)
			}
		}
	} else {
		wantFDB = []string{
			"00:00:00:00:00:00 dst 192.168.250.11 self permanent",
			"00:00:00:00:00:00 dst 192.168.250.12 self permanent",
			"02:00:00:00:03:01 dst 192.168.250.11 self permanent",
			"02:00:00:00:03:02 dst 192.168.250.12 self permanent",
		}
		if got := fdbSelf(t, n); !slices.Equal(got, wantFDB) {
			t.Fatalf("FDB:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantFDB, "\n"))
		}
		bridgeFDB := mustRun(t, "bridge", "-n", a.ovName("net1"), "fdb", "show", "dev", "vxlan0")
		for _, m := range []string{"02:00:00:00:03:01 master br0 static", "02:00:00:00:03:02 master br0 static"} {
			if !strings.Contains(bridgeFDB, m) {
				t.Fatalf("bridge fdb lacks %q:\n%s", m, bridgeFDB)
			}
		}
	}
	wantNeigh := []string{
		"10.30.0.2 lladdr 02:00:00:00:03:01 permanent",
		"10.30.0.3 lladdr 02:00:00:00:03:02 permanent",
		"fd00:30::2 lladdr 02:00:00:00:03:01 permanent",
	}
	if got := permanentNeigh(t, n); !slices.Equal(got, wantNeigh) {
		t.Fatalf("neighbours:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantNeigh, "\n"))
	}
	// fdbEntries is what the current FDB looks like, per encap.
	fdbEntries := func() []string {
		if gre {
			return staticFDB(t, n)
		}
		return fdbSelf(t, n)
	}

	// Nothing to do the second time.
	if changes, err := n.SetPeers([]overlay.Peer{p1, p2, self}, []netip.Addr{a.ip, x}); err != nil || changes != 0 {
		t.Fatalf("repeated SetPeers: %d changes, %v; want 0", changes, err)
	}

	// p1 moves to z, p2 goes away. VXLAN: fdb p1@x, p2@y, 0@y go, p1@z
	// and 0@z come (0@x stays: x is still listed), bridge p2 and neigh p2
	// go. GRE: the tunnel to z comes, the one to y goes, bridge p1@x and
	// p2@y go, p1@z comes, neigh p2 goes.
	changes, err = n.SetPeers([]overlay.Peer{{HostIP: z, MAC: p1.MAC, IPs: p1.IPs}}, []netip.Addr{x})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[bool]int{false: 7, true: 6}[gre]; changes != want {
		t.Fatalf("SetPeers after move: %d changes, want %d", changes, want)
	}
	if gre {
		ts := tunnels(t, n)
		if _, ok := ts[y]; len(ts) != 2 || ok {
			t.Fatalf("tunnels after move: %v, want to %s and %s", ts, x, z)
		}
		checkTunnel(t, a, "net1", ts[z], a.ip, z, 30)
		wantFDB = []string{"02:00:00:00:03:01 dst 192.168.250.13 master br0 static"}
	} else {
		wantFDB = []string{
			"00:00:00:00:00:00 dst 192.168.250.11 self permanent",
			"00:00:00:00:00:00 dst 192.168.250.13 self permanent",
			"02:00:00:00:03:01 dst 192.168.250.13 self permanent",
		}
	}
	if got := fdbEntries(); !slices.Equal(got, wantFDB) {
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
	if got := fdbEntries(); !slices.Equal(got, wantFDB) {
		t.Fatalf("refused SetPeers changed the FDB: %v", got)
	}

	if gre {
		// A restarted process finds the GRE network (which has no vxlan0)
		// and its tunnels, and changes nothing.
		before := tunnels(t, n)
		restarted := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix}
		found, err := restarted.Network("net1")
		if err != nil {
			t.Fatal(err)
		}
		if found.Encap != "gre" || found.VNI != 30 || found.LocalIP != a.ip || found.MTU != n.MTU {
			t.Fatalf("Network() after restart = %+v, want gre VNI 30 local %s MTU %d", found, a.ip, n.MTU)
		}
		if _, err := restarted.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 30, Encap: encap, LocalIP: a.ip}); err != nil {
			t.Fatal(err)
		}
		if changes, err := found.SetPeers([]overlay.Peer{{HostIP: z, MAC: p1.MAC, IPs: p1.IPs}}, []netip.Addr{x}); err != nil || changes != 0 {
			t.Fatalf("SetPeers after restart: %d changes, %v; want 0", changes, err)
		}
		for _, dev := range before {
			if l, ok := link(t, a.ovName("net1"), dev.Name); !ok || l.Master != "br0" || !l.up() {
				t.Fatalf("tunnel %s after restart: exists %v master %q up %v", dev.Name, ok, l.Master, l.up())
			}
		}
		if got := staticFDB(t, found); !slices.Equal(got, wantFDB) {
			t.Fatalf("FDB after restart: %v", got)
		}
	}

	// Empty: everything goes.
	if _, err := n.SetPeers(nil, nil); err != nil {
		t.Fatal(err)
	}
	if got := fdbEntries(); len(got) != 0 {
		t.Fatalf("FDB after SetPeers(nil): %v", got)
	}
	if got := permanentNeigh(t, n); len(got) != 0 {
		t.Fatalf("neighbours after SetPeers(nil): %v", got)
	}
	if gre {
		if ts := tunnels(t, n); len(ts) != 0 {
			t.Fatalf("tunnels after SetPeers(nil): %v", ts)
		}
	}
}

// TestTwoHostsPing is the data plane end to end: two hosts, one container
// each, reachable over VXLAN or GRE through static entries only.
func TestTwoHostsPing(t *testing.T) {
	forEachEncap(t, testTwoHostsPing)
}

func testTwoHostsPing(t *testing.T, encap string) {
	hs := newHosts(t, 2)
	a, b := hs[0], hs[1]
	gre := encap == overlay.EncapGRE
	gw := []netip.Prefix{netip.MustParsePrefix("10.40.0.1/24"), netip.MustParsePrefix("fd00:40::1/64")}
	nets := map[*testHost]*overlay.Network{}
	for _, h := range hs {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "net1", VNI: 40, Encap: encap, LocalIP: h.ip, Gateways: gw})
		if err != nil {
			t.Fatal(err)
		}
		// Underlay 1500 minus VXLAN's 50 or GRE's 42.
		if want := map[bool]int{false: 1450, true: 1458}[gre]; n.MTU != want {
			t.Fatalf("MTU %d, want %d", n.MTU, want)
		}
		if n.Encap != encap {
			t.Fatalf("Network.Encap %q, want %q", n.Encap, encap)
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
		// VXLAN: zero fdb, peer fdb, bridge fdb, 2 neighbours. GRE:
		// tunnel, bridge fdb, 2 neighbours.
		if want := map[bool]int{false: 5, true: 4}[gre]; changes != want {
			t.Fatalf("SetPeers: %d changes, want %d", changes, want)
		}
	}
	if gre {
		ts := tunnels(t, nets[a])
		if len(ts) != 1 {
			t.Fatalf("tunnels on A: %v, want one to %s", ts, b.ip)
		}
		checkTunnel(t, a, "net1", ts[b.ip], a.ip, b.ip, 40)
		if l, _ := link(t, a.ovName("net1"), ts[b.ip].Name); l.MTU != 1458 {
			t.Fatalf("tunnel MTU %d, want 1458", l.MTU)
		}
	}
	mustPing(t, cA, "10.40.0.3")
	mustPing(t, cB, "10.40.0.2")
	mustPing(t, cA, "fd00:40::3")
	mustPing(t, cB, "fd00:40::2")

	// Full-size packets cross without being fragmented on the underlay:
	// the MTU leaves room for the encapsulation (with 4 bytes less room,
	// GRE's often-quoted 38, such packets are dropped: ping sets DF).
	frags := fragCreates(t, a) + fragCreates(t, b)
	size := fmt.Sprint(nets[a].MTU - 28) // IPv4 20 + ICMP 8
	if out, err := cA.Exec("busybox", "ping", "-c", "2", "-W", "2", "-s", size, "10.40.0.3"); err != nil {
		t.Fatalf("full-size ping (%s bytes of data): %v: %s", size, err, out)
	}
	if got := fragCreates(t, a) + fragCreates(t, b) - frags; got != 0 {
		t.Fatalf("full-size packets made %d fragments on the underlay: MTU %d leaves too little room for %s", got, nets[a].MTU, encap)
	}

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
		t.Fatalf("%s learning is on", encap)
	}
	if st.Encap != encap || st.VNI != 40 || st.LocalIP != a.ip {
		t.Fatalf("State: encap %q VNI %d local %s; want %s 40 %s", st.Encap, st.VNI, st.LocalIP, encap, a.ip)
	}
	var got, want []string
	for _, e := range st.FDB {
		if e.State != "permanent" || (e.Self && !gre) {
			got = append(got, e.String())
		}
	}
	if gre {
		want = []string{"02:00:00:00:04:0b dst 192.168.250.2 master br0 static"}
	} else {
		want = []string{
			"00:00:00:00:00:00 dst 192.168.250.2 self permanent",
			"02:00:00:00:04:0b dst 192.168.250.2 self permanent",
			"02:00:00:00:04:0b master br0 static",
		}
	}
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Fatalf("FDB of the tunnel on host A:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	if !gre {
		// ARP and ND for remote addresses are answered on the local host:
		// with the broadcast (all-zero) entries gone and caches flushed,
		// containers still resolve each other.
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
	}

	// B leaves: SetPeers removes its endpoint and host from A, and A's
	// container can no longer reach it, even with B's MAC cached.
	changes, err := nets[a].SetPeers([]overlay.Peer{epA}, []netip.Addr{a.ip})
	if err != nil {
		t.Fatal(err)
	}
	if want := map[bool]int{false: 5, true: 4}[gre]; changes != want {
		t.Fatalf("removing B: %d changes, want %d", changes, want)
	}
	if got := fdbSelf(t, nets[a]); len(got) != 0 {
		t.Fatalf("FDB on A after B left: %v", got)
	}
	if got := staticFDB(t, nets[a]); len(got) != 0 {
		t.Fatalf("bridge FDB on A after B left: %v", got)
	}
	if ts := tunnels(t, nets[a]); len(ts) != 0 {
		t.Fatalf("tunnels on A after B left: %v", ts)
	}
	mustNotPing(t, cA, "10.40.0.3")
	mustNotPing(t, cA, "fd00:40::3")

	// And back.
	if _, err := nets[a].SetPeers(all, hosts); err != nil {
		t.Fatal(err)
	}
	mustPing(t, cA, "10.40.0.3")
}

// TestGREMeshHasNoLoop runs three hosts on GRE, a full mesh of tunnels:
// every container reaches every other, and a broadcast is delivered once
// to each host instead of circling the mesh (the tunnel ports are
// isolated: split horizon).
func TestGREMeshHasNoLoop(t *testing.T) {
	needEncap(t, overlay.EncapGRE)
	hs := newHosts(t, 3)
	var nets []*overlay.Network
	var peers []overlay.Peer
	var conts []*testenv.NetNS
	for i, h := range hs {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "mesh", VNI: 80, Encap: overlay.EncapGRE, LocalIP: h.ip})
		if err != nil {
			t.Fatal(err)
		}
		m := mac(t, fmt.Sprintf("02:00:00:00:08:%02x", i+1))
		ifName, err := n.AddEndpoint(overlay.Endpoint{ID: fmt.Sprintf("meshep%d", i+1), MAC: m})
		if err != nil {
			t.Fatal(err)
		}
		ip := fmt.Sprintf("10.80.0.%d", i+2)
		conts = append(conts, container(t, h, ifName, ip+"/24"))
		nets = append(nets, n)
		peers = append(peers, overlay.Peer{HostIP: h.ip, MAC: m, IPs: []netip.Addr{netip.MustParseAddr(ip)}})
	}
	for i, n := range nets {
		if _, err := n.SetPeers(peers, nil); err != nil {
			t.Fatal(err)
		}
		if ts := tunnels(t, n); len(ts) != 2 {
			t.Fatalf("host %d has tunnels %v, want 2", i+1, ts)
		}
	}
	for i, c := range conts {
		for j := range conts {
			if i != j {
				mustPing(t, c, fmt.Sprintf("10.80.0.%d", j+2))
			}
		}
	}

	// Broadcasts: ARP requests for an address nobody has go to every
	// tunnel (no neighbour entry to answer them locally). Count the
	// packets the tunnel ports receive: each request reaches each other
	// host once. Were frames forwarded from tunnel to tunnel, each would
	// circle the mesh for ever and the counters would run away.
	rx := func() int {
		total := 0
		for i, h := range hs {
			for _, ts := range tunnels(t, nets[i]) {
				out := mustRun(t, "ip", "-j", "-s", "-n", h.ovName("mesh"), "link", "show", "dev", ts.Name)
				var ls []struct {
					Stats struct {
						RX struct {
							Packets int `json:"packets"`
						} `json:"rx"`
					} `json:"stats64"`
				}
				if err := json.Unmarshal([]byte(out), &ls); err != nil || len(ls) != 1 {
					t.Fatalf("parse ip -j -s output %q: %v", out, err)
				}
				total += ls[0].Stats.RX.Packets
			}
		}
		return total
	}
	// No IPv6 from here on: its router solicitations and MLD reports from
	// the containers, bridges and tunnel ports would blur the count.
	for i, h := range hs {
		mustRun(t, "ip", "netns", "exec", h.ovName("mesh"), "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
		conts[i].MustExec("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
	}
	before := rx()
	const requests = 3
	out, _ := conts[0].Exec("busybox", "arping", "-c", fmt.Sprint(requests), "-w", "2", "-I", "eth0", "10.80.0.99")
	time.Sleep(500 * time.Millisecond)
	got := rx() - before
	// 2 remote hosts x 3 requests; a little slack for stray IPv6 ND/MLD.
	if got < 2*requests || got > 2*requests+10 {
		t.Fatalf("tunnel ports received %d packets for %d broadcast ARP requests, want about %d (arping: %s)", got, requests, 2*requests, out)
	}
	t.Logf("tunnel ports received %d packets for %d broadcasts to 2 remote hosts", got, requests)
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

// TestGRE checks encap gre where the kernel decides: without gretap, a
// clear error and nothing left behind; with it, a GRE network that a
// restarted process finds, and switching encap replaces the devices.
func TestGRE(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	if err := overlay.Available("vxlan"); err != nil {
		t.Fatalf("Available(vxlan): %v", err)
	}
	loadGREModule(t)
	cfg := overlay.NetworkConfig{ID: "gre1", VNI: 60, LocalIP: a.ip, Encap: "gre"}
	err := overlay.Available("gre")
	if err != nil {
		if !errors.Is(err, overlay.ErrNoGRETap) {
			t.Fatalf("Available(gre) = %v, want ErrNoGRETap", err)
		}
		if requireGRE() {
			t.Fatalf("DNP_REQUIRE_GRE=1 but kernel %s has no gretap: %v", kernelRelease(), err)
		}
		t.Logf("kernel %s has no gretap: checking the error users get", kernelRelease())
		_, err = a.host.EnsureNetwork(cfg)
		if !errors.Is(err, overlay.ErrNoGRETap) || !strings.Contains(err.Error(), "kernel has no GRE tap support (gretap); use encap=vxlan") {
			t.Fatalf("EnsureNetwork(encap=gre) = %v, want the clear gretap error", err)
		}
		if ids, _ := a.host.ListNetworks(); len(ids) != 0 {
			t.Fatalf("failed gre network left namespaces: %v", ids)
		}
		return
	}

	t.Logf("kernel %s has gretap: checking GRE networks", kernelRelease())
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if n.Encap != "gre" || n.MTU != 1458 {
		t.Fatalf("network: encap %q MTU %d, want gre 1458", n.Encap, n.MTU)
	}
	if _, ok := link(t, a.ovName("gre1"), "vxlan0"); ok {
		t.Fatal("a gre network has vxlan0")
	}
	restarted := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix}
	found, err := restarted.Network("gre1")
	if err != nil {
		t.Fatal(err)
	}
	if found.Encap != "gre" || found.VNI != 60 || found.LocalIP != a.ip || found.MTU != 1458 {
		t.Fatalf("Network() = %+v, want gre VNI 60 local %s MTU 1458", found, a.ip)
	}
	peer := overlay.Peer{HostIP: netip.MustParseAddr("192.168.250.20"), MAC: mac(t, "02:00:00:00:06:01")}
	if _, err := n.SetPeers([]overlay.Peer{peer}, nil); err != nil {
		t.Fatal(err)
	}
	ts := tunnels(t, n)
	checkTunnel(t, a, "gre1", ts[peer.HostIP], a.ip, peer.HostIP, 60)

	// A changed VNI replaces the tunnel (on SetPeers).
	cfg.VNI = 61
	n, err = a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.SetPeers([]overlay.Peer{peer}, nil); err != nil {
		t.Fatal(err)
	}
	checkTunnel(t, a, "gre1", tunnels(t, n)[peer.HostIP], a.ip, peer.HostIP, 61)

	// Switching encap replaces the devices, both ways.
	cfg.Encap = "vxlan"
	n, err = a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := n.State(); st.Encap != "vxlan" || len(st.Tunnels) != 0 {
		t.Fatalf("after switching to vxlan: encap %q tunnels %v", st.Encap, st.Tunnels)
	}
	cfg.Encap = "gre"
	if n, err = a.host.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	if _, ok := link(t, a.ovName("gre1"), "vxlan0"); ok {
		t.Fatal("vxlan0 still there after switching to gre")
	}
	if st, _ := n.State(); st.Encap != "gre" || st.VNI != 61 {
		t.Fatalf("after switching back to gre: encap %q VNI %d", st.Encap, st.VNI)
	}

	// Two networks cannot use one VNI towards the same host.
	n2, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "gre2", VNI: 61, LocalIP: a.ip, Encap: "gre"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.SetPeers([]overlay.Peer{peer}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := n2.SetPeers([]overlay.Peer{peer}, nil); err == nil || !strings.Contains(err.Error(), "already exists on this host") {
		t.Fatalf("second network with VNI 61 to the same host: err = %v", err)
	}

	// GRE needs an IPv4 underlay.
	v6 := netip.MustParseAddr("fd00:250::1")
	a.ns.IP("addr", "add", v6.String()+"/64", "dev", "ul0", "nodad")
	if _, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "gre6", VNI: 62, LocalIP: v6, Encap: "gre"}); err == nil || !strings.Contains(err.Error(), "needs an IPv4 underlay") {
		t.Fatalf("gre over IPv6: err = %v", err)
	}

	// Deleting the network deletes its tunnels, also their outer side:
	// the same tunnel can be made again at once.
	if err := a.host.DeleteNetwork("gre1"); err != nil {
		t.Fatal(err)
	}
	if _, err := n2.SetPeers([]overlay.Peer{peer}, nil); err != nil {
		t.Fatalf("tunnel of a deleted network still holds its key: %v", err)
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
