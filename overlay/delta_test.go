package overlay_test

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
)

// TestUpdatePeers: changes applied one at a time (host and peer added, an
// address replaced, peer and host removed) leave exactly what SetPeers
// would have made of the whole: VerifyNetwork finds nothing, SetPeers
// nothing to change.
func TestUpdatePeers(t *testing.T) {
	forEachEncap(t, testUpdatePeers)
}

func testUpdatePeers(t *testing.T, encap string) {
	hs := newHosts(t, 1)
	a := hs[0]
	gre := encap == overlay.EncapGRE
	cfg := overlay.NetworkConfig{ID: "upd", VNI: 31, Encap: encap, LocalIP: a.ip}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("192.168.250.21")
	y := netip.MustParseAddr("192.168.250.22")
	ip := netip.MustParseAddr
	p1 := overlay.Peer{HostIP: x, MAC: mac(t, "02:00:00:00:31:01"), IPs: []netip.Addr{ip("10.31.0.2"), ip("fd00:31::2")}}
	p2 := overlay.Peer{HostIP: y, MAC: mac(t, "02:00:00:00:31:02"), IPs: []netip.Addr{ip("10.31.0.3")}}

	update := func(when string, d overlay.Delta, wantChanges int) {
		t.Helper()
		changes, err := n.UpdatePeers(d)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if wantChanges >= 0 && changes != wantChanges {
			t.Fatalf("%s: %d changes, want %d", when, changes, wantChanges)
		}
	}
	// clean checks that the kernel holds exactly peers, with hosts and
	// the peers' hosts as the remote hosts: VerifyNetwork finds no
	// problem and SetPeers nothing to change.
	clean := func(when string, hosts []netip.Addr, peers ...overlay.Peer) {
		t.Helper()
		var wantProblems []string
		if gre && len(peers)+len(hosts) == 0 {
			// A bridge without ports takes MTU 1500 (the same after
			// SetPeers(nil, nil)); the next tunnel port brings it back.
			wantProblems = []string{fmt.Sprintf("wrong reconcile br0 has MTU 1500, want %d", n.MTU)}
		}
		checkProblems(t, when, verify(t, a, overlay.Want{NetworkConfig: cfg, Peers: peers, Hosts: hosts}), wantProblems)
		if changes, err := n.SetPeers(peers, hosts); err != nil || changes != 0 {
			t.Fatalf("%s: SetPeers afterwards: %d changes, %v; want 0", when, changes, err)
		}
	}
	fdb := func() []string {
		if gre {
			return staticFDB(t, n)
		}
		return fdbSelf(t, n)
	}
	members := func(want ...netip.Addr) {
		t.Helper()
		st, err := n.State()
		if err != nil {
			t.Fatal(err)
		}
		if gre || st.Filter.Unavailable != "" {
			return
		}
		if !slices.Equal(st.Filter.Members, want) {
			t.Fatalf("source filter members %v, want %v", st.Filter.Members, want)
		}
	}

	// Host x and its peer p1. VXLAN: zero entry, fdb, bridge, 2 neighbours;
	// GRE: tunnel, bridge, 2 neighbours.
	update("add x and p1", overlay.Delta{AddHosts: []netip.Addr{x}, Add: []overlay.Peer{p1}}, map[bool]int{false: 5, true: 4}[gre])
	wantFDB := []string{
		"00:00:00:00:00:00 dst 192.168.250.21 self permanent",
		"02:00:00:00:31:01 dst 192.168.250.21 self permanent",
	}
	if gre {
		wantFDB = []string{"02:00:00:00:31:01 dst 192.168.250.21 master br0 static"}
		if ts := tunnels(t, n); len(ts) != 1 {
			t.Fatalf("tunnels %v, want one to %s", ts, x)
		} else {
			checkTunnel(t, a, "upd", ts[x], a.ip, x, 31)
		}
	}
	if got := fdb(); !slices.Equal(got, wantFDB) {
		t.Fatalf("FDB:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantFDB, "\n"))
	}
	wantNeigh := []string{"10.31.0.2 lladdr 02:00:00:00:31:01 permanent", "fd00:31::2 lladdr 02:00:00:00:31:01 permanent"}
	if got := permanentNeigh(t, n); !slices.Equal(got, wantNeigh) {
		t.Fatalf("neighbours:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantNeigh, "\n"))
	}
	members(x)
	clean("after adding x and p1", nil, p1)

	// Host y and p2; this host's own endpoints and address are ignored.
	self := overlay.Peer{HostIP: a.ip, MAC: mac(t, "02:00:00:00:31:09"), IPs: []netip.Addr{ip("10.31.0.9")}}
	update("add y and p2", overlay.Delta{AddHosts: []netip.Addr{y, a.ip}, Add: []overlay.Peer{p2, self}}, -1)
	members(x, y)
	clean("after adding y and p2", nil, p1, p2)

	// p1's addresses change: only its neighbour entries do.
	p1b := overlay.Peer{HostIP: x, MAC: p1.MAC, IPs: []netip.Addr{ip("10.31.0.5")}}
	before := fdb()
	update("replace p1's addresses", overlay.Delta{Remove: []overlay.Peer{p1}, Add: []overlay.Peer{p1b}}, -1)
	if got := fdb(); !slices.Equal(got, before) {
		t.Fatalf("FDB after replacing addresses:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(before, "\n"))
	}
	wantNeigh = []string{"10.31.0.3 lladdr 02:00:00:00:31:02 permanent", "10.31.0.5 lladdr 02:00:00:00:31:01 permanent"}
	if got := permanentNeigh(t, n); !slices.Equal(got, wantNeigh) {
		t.Fatalf("neighbours after replacing addresses:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantNeigh, "\n"))
	}
	clean("after replacing p1's addresses", nil, p1b, p2)

	// p1 moves to y with an Add alone (x stays a remote host).
	p1c := overlay.Peer{HostIP: y, MAC: p1.MAC, IPs: p1b.IPs}
	update("move p1 to y", overlay.Delta{Add: []overlay.Peer{p1c}}, -1)
	clean("after moving p1", []netip.Addr{x}, p1c, p2)

	// p1 and p2 go, then host x; removing what is not there is no error.
	update("remove p1", overlay.Delta{Remove: []overlay.Peer{p1c}}, map[bool]int{false: 3, true: 2}[gre])
	update("remove p1 again", overlay.Delta{Remove: []overlay.Peer{p1c}}, 0)
	update("remove x", overlay.Delta{RemoveHosts: []netip.Addr{x}}, 1)
	members(y)
	clean("after removing p1 and x", nil, p2)
	update("remove p2 and y", overlay.Delta{Remove: []overlay.Peer{p2}, RemoveHosts: []netip.Addr{y}}, -1)
	members()
	if got := fdb(); len(got) != 0 {
		t.Fatalf("FDB after removing everything: %v", got)
	}
	if got := permanentNeigh(t, n); len(got) != 0 {
		t.Fatalf("neighbours after removing everything: %v", got)
	}
	if ts := tunnels(t, n); len(ts) != 0 {
		t.Fatalf("tunnels after removing everything: %v", ts)
	}
	clean("after removing everything", nil)

	// Contradictions are refused before anything changes.
	bad := []overlay.Delta{
		{Add: []overlay.Peer{{HostIP: x, MAC: mac(t, "01:00:5e:00:00:01")}}, AddHosts: []netip.Addr{x}},
		{AddHosts: []netip.Addr{netip.MustParseAddr("fd00::1")}},
		{AddHosts: []netip.Addr{x}, RemoveHosts: []netip.Addr{x}},
		{Add: []overlay.Peer{p1}, RemoveHosts: []netip.Addr{x}},
		{Add: []overlay.Peer{p1, {HostIP: y, MAC: p1.MAC}}, AddHosts: []netip.Addr{x, y}},
		{Remove: []overlay.Peer{{HostIP: x, MAC: p1.MAC, IPs: []netip.Addr{{}}}}},
	}
	if gre {
		// A peer on a host without a tunnel port.
		bad = append(bad, overlay.Delta{Add: []overlay.Peer{p1}})
	}
	for i, d := range bad {
		if _, err := n.UpdatePeers(d); err == nil {
			t.Errorf("bad delta %d: no error", i)
		}
	}
	clean("after refused deltas", nil)
}

// TestUpdatePeersEncrypted: on an encrypted network the data path's
// members follow AddHosts and RemoveHosts.
func TestUpdatePeersEncrypted(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	encrypt(t, a, time.Minute)
	cfg := overlay.NetworkConfig{ID: "encupd", VNI: 32, LocalIP: a.ip, Encrypted: true}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := n.SetPeers(nil, nil); err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("192.168.250.31")
	y := netip.MustParseAddr("192.168.250.32")
	p := overlay.Peer{HostIP: x, MAC: mac(t, "02:00:00:00:32:01"), IPs: []netip.Addr{netip.MustParseAddr("10.32.0.2")}}
	members := func(when string, want ...string) {
		t.Helper()
		st, err := a.host.EncryptionStatus()
		if err != nil {
			t.Fatal(err)
		}
		got := slices.Clone(st.VNIs[cfg.VNI])
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Fatalf("%s: data path members of VNI %d: %v, want %v", when, cfg.VNI, got, want)
		}
	}
	if _, err := n.UpdatePeers(overlay.Delta{AddHosts: []netip.Addr{x, y}, Add: []overlay.Peer{p}}); err != nil {
		t.Fatal(err)
	}
	members("after adding x and y", x.String(), y.String())
	checkProblems(t, "after adding", verify(t, a, overlay.Want{NetworkConfig: cfg, Peers: []overlay.Peer{p}, Hosts: []netip.Addr{y}}), nil)
	if _, err := n.UpdatePeers(overlay.Delta{Remove: []overlay.Peer{p}, RemoveHosts: []netip.Addr{x}}); err != nil {
		t.Fatal(err)
	}
	members("after removing x", y.String())
	checkProblems(t, "after removing", verify(t, a, overlay.Want{NetworkConfig: cfg, Hosts: []netip.Addr{y}}), nil)
	if changes, err := n.SetPeers(nil, []netip.Addr{y}); err != nil || changes != 0 {
		t.Fatalf("SetPeers afterwards: %d changes, %v; want 0", changes, err)
	}
}
