package overlay_test

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/dnplabs/docker-net-plugin/internal/mcast"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// TestMulticast: three hosts on one VXLAN network. The bridge snoops with a
// querier; a group goes to exactly the remote hosts SetGroups names, a
// group nobody wants stays on its host, link-local groups reach every host.
func TestMulticast(t *testing.T) {
	hs := newHosts(t, 3)
	created := time.Now()
	const id, vni = "mc", 77
	nets := make([]*overlay.Network, len(hs))
	var peers []overlay.Peer
	ctrs := make([]*testenv.NetNS, len(hs))
	var sender *testenv.NetNS
	for i, h := range hs {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: id, VNI: vni, LocalIP: h.ip})
		if err != nil {
			t.Fatal(err)
		}
		nets[i] = n
		p := overlay.Peer{HostIP: h.ip, MAC: mac(t, fmt.Sprintf("02:00:00:00:77:%02x", i+1)),
			IPs: []netip.Addr{netip.MustParseAddr(fmt.Sprintf("10.77.0.%d", i+11))}}
		ifName, err := n.AddEndpoint(overlay.Endpoint{ID: fmt.Sprintf("receiver%d", i+1), MAC: p.MAC})
		if err != nil {
			t.Fatal(err)
		}
		ctrs[i] = mcastContainer(t, h, ifName, p.IPs[0].String()+"/24", fmt.Sprintf("fd77::%d/64", i+11))
		peers = append(peers, p)
	}
	{ // a second endpoint on host 1 sends
		p := overlay.Peer{HostIP: hs[0].ip, MAC: mac(t, "02:00:00:00:77:10"), IPs: []netip.Addr{netip.MustParseAddr("10.77.0.10")}}
		ifName, err := nets[0].AddEndpoint(overlay.Endpoint{ID: "sender", MAC: p.MAC})
		if err != nil {
			t.Fatal(err)
		}
		sender = mcastContainer(t, hs[0], ifName, "10.77.0.10/24", "fd77::10/64")
		peers = append(peers, p)
	}
	for _, n := range nets {
		if _, err := n.SetPeers(peers, nil); err != nil {
			t.Fatal(err)
		}
	}

	// The bridge snoops with its own querier; the VXLAN port is never a
	// multicast router port.
	br := hs[0].ovIP(t, id, "-d", "link", "show", "dev", "br0")
	for _, want := range []string{"mcast_snooping 1", "mcast_querier 1", "mcast_igmp_version 3", "mcast_mld_version 2", "mcast_membership_interval 52000", "mcast_query_response_interval 100"} {
		if !strings.Contains(br, want) {
			t.Errorf("br0 lacks %q:\n%s", want, br)
		}
	}
	if port := mustRun(t, "bridge", "-n", hs[0].ovName(id), "-d", "link", "show", "dev", "vxlan0"); !strings.Contains(port, "mcast_router 0") {
		t.Errorf("vxlan0 is not mcast_router 0:\n%s", port)
	}

	// A receiver on host 2 joins; host 2's bridge learns it.
	g := netip.MustParseAddrPort("239.7.7.7:7000")
	recv := startReceiver(t, ctrs[1], g, 300)
	waitUntil(t, 5*time.Second, "host 2 sees the group joined", func() bool {
		groups, err := nets[1].Groups()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(groups, g.Addr()) {
			t.Logf("host 2 groups %v; MDB %v", groups, mdbStrings(t, nets[1], false))
			return false
		}
		return true
	})
	if groups, _ := nets[2].Groups(); slices.ContainsFunc(groups, netip.Addr.Is4) {
		t.Errorf("host 3 has IPv4 groups %v, want none", groups)
	}

	// Host 1 sends the group to host 2 only.
	want := map[netip.Addr][]netip.Addr{g.Addr(): {hs[1].ip}}
	if c, err := nets[0].SetGroups(want); err != nil || c != 2 {
		t.Fatalf("SetGroups: %d changes, %v; want 2 (bridge and VXLAN MDB entry)", c, err)
	}
	if c, err := nets[0].SetGroups(want); err != nil || c != 0 {
		t.Fatalf("SetGroups again: %d changes, %v; want 0", c, err)
	}
	mdb := mdbStrings(t, nets[0], true)
	for _, e := range []string{
		"dev br0 port vxlan0 grp 239.7.7.7 permanent",
		"dev vxlan0 port vxlan0 grp 239.7.7.7 permanent dst " + hs[1].ip.String(),
	} {
		if !slices.Contains(mdb, e) {
			t.Errorf("host 1 MDB lacks %q: %v", e, mdb)
		}
	}

	before := vxlanRx(t, hs)
	send(t, sender, g, 300)
	res := recv.wait(t)
	after := vxlanRx(t, hs)
	if res.Unique != 300 {
		t.Errorf("receiver on host 2 got %d of 300 datagrams (%+v)", res.Unique, res)
	}
	if d := after[1] - before[1]; d < 300 {
		t.Errorf("host 2's VXLAN device received %d packets, want at least 300", d)
	}
	if d := after[2] - before[2]; d > 10 {
		t.Errorf("host 3 (no receiver) got %d VXLAN packets for 300 datagrams, want none", d)
	}
	t.Logf("group with a receiver on host 2: host 2 got %d/300, VXLAN packets into host 2 %d, host 3 %d",
		res.Unique, after[1]-before[1], after[2]-before[2])

	// IPv6: a receiver on host 3 only.
	g6 := netip.MustParseAddrPort("[ff0e::77]:7001")
	recv = startReceiver(t, ctrs[2], g6, 300)
	waitUntil(t, 5*time.Second, "host 3 sees the IPv6 group joined", func() bool {
		groups, err := nets[2].Groups()
		return err == nil && slices.Contains(groups, g6.Addr())
	})
	if _, err := nets[0].SetGroups(map[netip.Addr][]netip.Addr{g.Addr(): {hs[1].ip}, g6.Addr(): {hs[2].ip}}); err != nil {
		t.Fatal(err)
	}
	before = vxlanRx(t, hs)
	send(t, sender, g6, 300)
	res = recv.wait(t)
	after = vxlanRx(t, hs)
	if res.Unique != 300 {
		t.Errorf("IPv6 receiver on host 3 got %d of 300 datagrams (%+v)", res.Unique, res)
	}
	if d := after[1] - before[1]; d > 10 {
		t.Errorf("host 2 (no IPv6 receiver) got %d VXLAN packets for 300 datagrams, want none", d)
	}

	// A group nobody joined stays on host 1, once the bridge's querier
	// has waited its response interval.
	time.Sleep(time.Until(created.Add(2 * time.Second)))
	before = vxlanRx(t, hs)
	send(t, sender, netip.MustParseAddrPort("239.7.7.8:7000"), 200)
	after = vxlanRx(t, hs)
	for i := 1; i < 3; i++ {
		if d := after[i] - before[i]; d > 10 {
			t.Errorf("host %d got %d VXLAN packets of a group nobody joined", i+1, d)
		}
	}

	// Link-local groups (mDNS) go to every host.
	mdns := netip.MustParseAddrPort("224.0.0.251:5353")
	r2, r3 := startReceiver(t, ctrs[1], mdns, 100), startReceiver(t, ctrs[2], mdns, 100)
	send(t, sender, mdns, 100)
	for i, r := range []*receiver{r2, r3} {
		if res := r.wait(t); res.Unique != 100 {
			t.Errorf("mDNS receiver on host %d got %d of 100", i+2, res.Unique)
		}
	}

	// Nothing wanted any more: the entries go.
	if c, err := nets[0].SetGroups(nil); err != nil || c != 4 {
		t.Fatalf("SetGroups(nil): %d changes, %v; want 4", c, err)
	}
	if mdb := mdbStrings(t, nets[0], true); len(mdb) != 0 {
		t.Errorf("permanent MDB entries left: %v", mdb)
	}
	if _, err := nets[0].SetGroups(map[netip.Addr][]netip.Addr{netip.MustParseAddr("10.0.0.1"): {hs[1].ip}}); err == nil {
		t.Error("SetGroups accepted a unicast group")
	}
}

// mcastContainer is container with a route for multicast through eth0,
// as the driver's Join gives one.
func mcastContainer(t *testing.T, h *testHost, hostIf string, addrs ...string) *testenv.NetNS {
	c := container(t, h, hostIf, addrs...)
	c.IP("route", "add", "224.0.0.0/4", "dev", "eth0")
	return c
}

// mdbStrings lists the network's MDB entries (only permanent ones if asked).
func mdbStrings(t *testing.T, n *overlay.Network, permanent bool) []string {
	t.Helper()
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range st.MDB {
		if !permanent || e.Permanent {
			out = append(out, e.String())
		}
	}
	return out
}

// vxlanRx reads how many packets each host's VXLAN device received.
func vxlanRx(t *testing.T, hs []*testHost) []uint64 {
	t.Helper()
	out := make([]uint64, len(hs))
	for i, h := range hs {
		err := inNS("/run/netns/"+h.ovName("mc"), func() error {
			l, err := netlink.LinkByName("vxlan0")
			if err != nil {
				return err
			}
			out[i] = l.Attrs().Statistics.RxPackets
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

type receiver struct {
	done chan mcast.Result
	err  chan error
}

// startReceiver joins g in c (interface chosen by the kernel) and counts
// datagrams until n arrived or a second passed without one.
func startReceiver(t *testing.T, c *testenv.NetNS, g netip.AddrPort, n int) *receiver {
	t.Helper()
	cfg := mcast.RecvConfig{Group: g, Expect: n, Timeout: 20 * time.Second, Idle: time.Second, Run: 1}
	r := &receiver{done: make(chan mcast.Result, 1), err: make(chan error, 1)}
	var ifName string
	err := inNS(c.Path(), func() error {
		conn, name, err := mcast.Join(cfg)
		if err != nil {
			return err
		}
		ifName = name
		go func() {
			defer conn.Close()
			res, err := mcast.Receive(context.Background(), conn, cfg)
			r.done <- res
			r.err <- err
		}()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if ifName != "eth0" {
		t.Errorf("joined %s on %q, want eth0", g, ifName)
	}
	return r
}

func (r *receiver) wait(t *testing.T) mcast.Result {
	t.Helper()
	res := <-r.done
	if err := <-r.err; err != nil {
		t.Fatal(err)
	}
	return res
}

// send sends n datagrams to g from c at 1000 a second.
func send(t *testing.T, c *testenv.NetNS, g netip.AddrPort, n int) {
	t.Helper()
	err := inNS(c.Path(), func() error {
		_, err := mcast.Send(context.Background(), mcast.SendConfig{Group: g, Count: n, Rate: 1000, Run: 1})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

// inNS runs fn on a thread in the namespace at path.
func inNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread ends with the goroutine
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

func waitUntil(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
