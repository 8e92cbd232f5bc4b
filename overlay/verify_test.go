package overlay_test

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
)

// TestVerifyNetwork: a network as EnsureNetwork, AddEndpoint and SetPeers
// made it verifies clean; damage done with iproute2 is reported, each
// problem once and with the repair that puts it right; those repairs
// (RemoveDevice, EnsureNetwork and SetPeers again, the endpoint added
// again) leave it clean.
func TestVerifyNetwork(t *testing.T) {
	forEachEncap(t, testVerifyNetwork)
}

func testVerifyNetwork(t *testing.T, encap string) {
	hs := newHosts(t, 1)
	a := hs[0]
	gre := encap == overlay.EncapGRE
	cfg := overlay.NetworkConfig{ID: "net1", VNI: 40, Encap: encap, LocalIP: a.ip,
		Gateways: []netip.Prefix{netip.MustParsePrefix("10.40.0.1/24")}}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	const epID = "0123456789abcdef"
	if _, err := n.AddEndpoint(overlay.Endpoint{ID: epID, MAC: mac(t, "02:00:00:00:04:01")}); err != nil {
		t.Fatal(err)
	}
	x := netip.MustParseAddr("192.168.250.11")
	y := netip.MustParseAddr("192.168.250.12")
	z := netip.MustParseAddr("192.168.250.13")
	peers := []overlay.Peer{
		{HostIP: x, MAC: mac(t, "02:00:00:00:04:11"), IPs: []netip.Addr{netip.MustParseAddr("10.40.0.11"), netip.MustParseAddr("fd00:40::11")}},
		{HostIP: y, MAC: mac(t, "02:00:00:00:04:12"), IPs: []netip.Addr{netip.MustParseAddr("10.40.0.12")}},
	}
	if _, err := n.SetPeers(peers, nil); err != nil {
		t.Fatal(err)
	}
	want := overlay.Want{NetworkConfig: cfg, Peers: peers, Endpoints: []string{epID}}
	mtu, err := a.host.MaxMTU(a.ip, encap, false)
	if err != nil {
		t.Fatal(err)
	}

	d := verify(t, a, want)
	wantDevices, wantFDB := "br0, vxlan0", 6 // zero entries for x and y, two per peer
	if gre {
		wantDevices, wantFDB = "br0, 2 GRE tunnel port(s)", 2 // one per peer
	}
	if len(d.Problems) != 0 || d.Devices != wantDevices || d.FDB != wantFDB || d.Neigh != 3 || d.MTU != mtu ||
		d.NetNS != filepath.Join(overlay.DefaultDir, a.ovName("net1")) {
		t.Fatalf("fresh network: %+v\nwant no problems, devices %q, %d forwarding and 3 neighbour entries, MTU %d, namespace %s",
			d, wantDevices, wantFDB, mtu, a.ovName("net1"))
	}

	// Another remote host wanted: what SetPeers would add for it.
	more := want
	more.Hosts = []netip.Addr{z}
	var wantMore []string
	if gre {
		wantMore = []string{fmt.Sprintf("missing reconcile GRE tunnel port %s to %s is missing", tunnelName(t, a, z), z)}
	} else {
		wantMore = []string{"missing reconcile forwarding (bridge fdb) entry missing: 00:00:00:00:00:00 dst " + z.String() + " self permanent"}
		st, err := n.State()
		if err != nil {
			t.Fatal(err)
		}
		if st.Filter.Unavailable == "" {
			wantMore = append(wantMore, "missing reconcile the source filter lacks member host "+z.String()+": its VXLAN for the network is dropped")
		} else {
			t.Logf("no source filter on this kernel: %s", st.Filter.Unavailable)
		}
	}
	checkProblems(t, "another remote host wanted", verify(t, a, more), wantMore)

	// Damage.
	ts := tunnels(t, n)
	ns := a.ovName("net1")
	port := strings.TrimSuffix(overlay.HostIfName(epID), "-h") + "-p"
	mustRun(t, "ip", "-n", ns, "link", "set", "br0", "mtu", "1300")
	mustRun(t, "ip", "-n", ns, "addr", "add", "10.41.0.1/24", "dev", "br0")
	mustRun(t, "ip", "-n", ns, "link", "set", port, "down")
	mustRun(t, "ip", "-n", ns, "link", "add", "stray0", "type", "vxlan", "id", "4242", "dstport", "4789")
	mustRun(t, "ip", "-n", ns, "neigh", "add", "10.40.0.99", "lladdr", "02:00:00:00:04:99", "dev", "br0", "nud", "permanent")
	wantDamage := []string{
		fmt.Sprintf("wrong reconcile br0 has MTU 1300, want %d", mtu),
		"wrong reconcile br0 has address 10.41.0.1/24, which is no gateway of the overlay",
		"wrong recreate " + epID + " " + port + " is down",
		"extra remove stray0 stray vxlan device stray0 in namespace " + d.NetNS + ": the plugin did not make it",
		"extra reconcile stale neighbour entry: 10.40.0.99 lladdr 02:00:00:00:04:99 permanent",
	}
	if gre {
		mustRun(t, "ip", "-n", ns, "link", "set", "br0", "type", "bridge", "mcast_snooping", "1")
		mustRun(t, "bridge", "-n", ns, "link", "set", "dev", ts[x].Name, "isolated", "off")
		mustRun(t, "ip", "-n", ns, "link", "del", ts[y].Name)
		wantDamage = append(wantDamage,
			"wrong reconcile br0 has multicast snooping on, want off",
			"wrong reconcile bridge port "+ts[x].Name+" has isolated off, want on",
			fmt.Sprintf("missing reconcile GRE tunnel port %s to %s is missing", ts[y].Name, y),
			"missing reconcile forwarding (bridge fdb) entry missing: 02:00:00:00:04:12 dst "+y.String()+" master br0 static",
		)
	} else {
		mustRun(t, "ip", "-n", ns, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0")
		mustRun(t, "bridge", "-n", ns, "link", "set", "dev", "vxlan0", "learning", "on")
		mustRun(t, "bridge", "-n", ns, "fdb", "del", "02:00:00:00:04:12", "dev", "vxlan0", "dst", y.String(), "self")
		wantDamage = append(wantDamage,
			"wrong reconcile br0 has multicast snooping off, want on",
			"wrong reconcile bridge port vxlan0 has learning on, want off",
			"missing reconcile forwarding (bridge fdb) entry missing: 02:00:00:00:04:12 dst "+y.String()+" self permanent",
		)
	}
	d = verify(t, a, want)
	checkProblems(t, "damaged", d, wantDamage)

	// The repairs each problem names.
	for _, p := range d.Problems {
		if p.Repair == overlay.RepairRemove {
			if err := a.host.RemoveDevice("net1", p.Device); err != nil {
				t.Fatal(err)
			}
		}
	}
	if n, err = a.host.EnsureNetwork(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := n.SetPeers(peers, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := n.AddEndpoint(overlay.Endpoint{ID: epID, MAC: mac(t, "02:00:00:00:04:01")}); err != nil {
		t.Fatal(err)
	}
	checkProblems(t, "repaired", verify(t, a, want), nil)

	// An orphaned endpoint's port is left alone; a port nobody wants is stray.
	ignored := want
	ignored.Endpoints, ignored.Ignore = nil, []string{epID}
	checkProblems(t, "endpoint ignored", verify(t, a, ignored), nil)
	gone := want
	gone.Endpoints = []string{"feedfacecafe0000"}
	checkProblems(t, "endpoint gone, another wanted", verify(t, a, gone), []string{
		"extra remove " + port + " stray veth device " + port + " in namespace " + d.NetNS + ": it was endpoint 01234567, which this host no longer has",
		"missing recreate feedfacecafe0000 has no port on br0: its container is cut off (or is starting or stopping right now)",
	})

	// A network with no namespace.
	other := want
	other.ID = "net2"
	if _, err := a.host.VerifyNetwork(other); !errors.Is(err, overlay.ErrNotFound) {
		t.Fatalf("VerifyNetwork of a network with no namespace: %v, want ErrNotFound", err)
	}
}

func verify(t *testing.T, h *testHost, want overlay.Want) *overlay.Diff {
	t.Helper()
	d, err := h.host.VerifyNetwork(want)
	if err != nil {
		t.Fatalf("VerifyNetwork: %v", err)
	}
	return d
}

// checkProblems compares d's problems, each as "kind repair [endpoint]
// [device] what", with want, in any order.
func checkProblems(t *testing.T, when string, d *overlay.Diff, want []string) {
	t.Helper()
	kinds := map[overlay.Kind]string{overlay.Missing: "missing", overlay.Extra: "extra", overlay.Wrong: "wrong"}
	repairs := map[overlay.Repair]string{overlay.RepairReconcile: "reconcile", overlay.RepairRemove: "remove", overlay.RepairRecreate: "recreate"}
	var got []string
	for _, p := range d.Problems {
		f := []string{kinds[p.Kind], repairs[p.Repair]}
		for _, s := range []string{p.Endpoint, p.Device, p.What} {
			if s != "" {
				f = append(f, s)
			}
		}
		got = append(got, strings.Join(f, " "))
	}
	slices.Sort(got)
	want = slices.Sorted(slices.Values(want))
	if !slices.Equal(got, want) {
		t.Fatalf("%s: problems:\n%s\nwant:\n%s", when, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// tunnelName is the name of h's GRE tunnel port to remote, as a network
// with a peer there shows it.
func tunnelName(t *testing.T, h *testHost, remote netip.Addr) string {
	t.Helper()
	cfg := overlay.NetworkConfig{ID: "names", VNI: 41, Encap: overlay.EncapGRE, LocalIP: h.ip}
	n, err := h.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h.host.DeleteNetwork(cfg.ID)
	if _, err := n.SetPeers(nil, []netip.Addr{remote}); err != nil {
		t.Fatal(err)
	}
	return tunnels(t, n)[remote].Name
}

// TestVerifyEncryptedNetwork: an encrypted network verifies clean (its
// VXLAN socket in the crypt namespace, its VNI filtered with no members);
// wanted unencrypted, the socket, the bridge's alias and the MTU differ.
func TestVerifyEncryptedNetwork(t *testing.T) {
	hs := newHosts(t, 1)
	a := hs[0]
	encrypt(t, a, time.Minute)
	cfg := overlay.NetworkConfig{ID: "enc", VNI: 42, LocalIP: a.ip, Encrypted: true}
	n, err := a.host.EnsureNetwork(cfg)
	if err != nil {
		t.Fatal(err)
	}
	peers := []overlay.Peer{{HostIP: netip.MustParseAddr("192.168.250.11"), MAC: mac(t, "02:00:00:00:04:21"), IPs: []netip.Addr{netip.MustParseAddr("10.42.0.11")}}}
	if _, err := n.SetPeers(peers, nil); err != nil {
		t.Fatal(err)
	}
	want := overlay.Want{NetworkConfig: cfg, Peers: peers}
	d := verify(t, a, want)
	checkProblems(t, "encrypted", d, nil)
	if d.MTU != n.MTU || d.FDB != 3 || d.Neigh != 1 {
		t.Fatalf("encrypted: MTU %d, %d forwarding and %d neighbour entries; want %d, 3 and 1", d.MTU, d.FDB, d.Neigh, n.MTU)
	}
	plain := want
	plain.Encrypted = false
	wantPlain := []string{
		`wrong reconcile br0 has alias "dnp encrypted", want ""`,
		fmt.Sprintf("wrong reconcile br0 has MTU %d, want %d", n.MTU, n.MTU+overlay.EncryptionOverhead),
		fmt.Sprintf("wrong reconcile vxlan0 has MTU %d, want %d", n.MTU, n.MTU+overlay.EncryptionOverhead),
		"wrong reconcile the UDP socket of vxlan0 is not in the host namespace",
	}
	if st, err := n.State(); err != nil {
		t.Fatal(err)
	} else if st.Filter.Unavailable == "" {
		wantPlain = append(wantPlain, "missing reconcile the source filter lacks member host 192.168.250.11: its VXLAN for the network is dropped")
	}
	checkProblems(t, "wanted unencrypted", verify(t, a, plain), wantPlain)
}
