package integration

import (
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/store"
)

// TestDriverCorrectness: what one user's mistake, one bad record or one
// removed network must not do to the rest of the cluster, on three hosts
// sharing etcd (one cluster for every part):
//   - two Docker networks of one host on one overlay: removing one keeps
//     the overlay (and its VNI and subnet) for the other, also across a
//     plugin restart (issue 12, item 1);
//   - a MAC held by another endpoint is refused at docker run, naming the
//     holder; a conflicting record that gets into the store anyway is
//     skipped, logged once, counted and shown, and the rest of the overlay
//     keeps converging (issue 12, item 2);
//   - a network whose addresses come from Docker's own per-host IPAM is
//     refused, unless each host declares a disjoint range; then an address
//     another host holds is refused naming that host (issue 20);
//   - input: an MTU the underlay cannot carry, hosts disagreeing on an
//     overlay's MTU, overlay names that are not names (issue 12, item 5).
func TestDriverCorrectness(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	plugins := map[*harness.Host]*plugin{}
	for _, h := range c.Hosts {
		plugins[h] = startPlugin(t, c, h, url, "--metrics-addr", h.UnderlayIP+":"+metricsPort)
	}
	t.Run("two networks on one overlay", func(t *testing.T) { testTwoNetworksOneOverlay(t, c, st, plugins) })
	t.Run("bad record costs only itself", func(t *testing.T) { testBadRecord(t, c, url, st, plugins) })
	t.Run("addresses from another IPAM", func(t *testing.T) { testForeignIPAM(t, c) })
	t.Run("input", func(t *testing.T) { testInput(t, c) })
	// Everything went with the containers and networks, claims included.
	waitFor(t, 15*time.Second, "store emptied", func() bool { return len(storeKeys(t, st)) == 0 })
}

// dnpNet creates a network of the plugin with its IPAM driver.
func dnpNet(h *harness.Host, name, subnet string, extra ...string) error {
	args := append([]string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", subnet}, extra...)
	_, err := h.Docker(append(args, name)...)
	return err
}

// removeAll removes the containers and networks named, on h.
func removeAll(t *testing.T, h *harness.Host, containers, networks []string) {
	t.Helper()
	if len(containers) > 0 {
		h.Docker(append([]string{"rm", "-f"}, containers...)...)
	}
	for _, n := range networks {
		if _, err := h.Docker("network", "inspect", n); err == nil {
			if err := networkRm(h, n); err != nil {
				t.Error(err)
			}
		}
	}
}

func storeHas(t *testing.T, st store.Store, key string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := st.Get(ctx, key)
	return err == nil
}

func testTwoNetworksOneOverlay(t *testing.T, c *harness.Cluster, st store.Store, plugins map[*harness.Host]*plugin) {
	h1, h2 := c.Hosts[0], c.Hosts[1]
	const subnet = "10.81.0.0/24"
	t.Cleanup(func() {
		removeAll(t, h1, []string{"keep1", "keep2"}, []string{"projA_blue", "projB_blue"})
		removeAll(t, h2, []string{"other"}, []string{"blue", "intruder"})
	})
	// Two Compose projects with the same networks: block on h1.
	for _, n := range []string{"projA_blue", "projB_blue"} {
		if err := dnpNet(h1, n, subnet, "-o", "overlay=shared"); err != nil {
			t.Fatal(err)
		}
	}
	ip1 := runContainer(t, h1, "keep1", "projB_blue")
	if err := networkRm(h1, "projA_blue"); err != nil {
		t.Fatal(err)
	}
	// projB_blue still uses overlay shared: it keeps its record, and
	// another host cannot take the name with another subnet.
	if !storeHas(t, st, driver.OverlayKey("shared")) {
		t.Fatal("removing projA_blue removed overlay shared while projB_blue still uses it")
	}
	err := dnpNet(h2, "intruder", "10.91.0.0/24", "-o", "overlay=shared")
	if err == nil || !strings.Contains(err.Error(), "already exists with subnets") {
		t.Fatalf("h2 creating overlay shared with another subnet after projA_blue went: %v; want it refused", err)
	}
	// After a plugin restart (nothing in memory) projB_blue still gets endpoints.
	plugins[h1].Stop()
	plugins[h1].Start(t)
	ip2 := runContainer(t, h1, "keep2", "projB_blue")
	// And the overlay still spans hosts.
	if err := dnpNet(h2, "blue", subnet, "-o", "overlay=shared"); err != nil {
		t.Fatal(err)
	}
	runContainer(t, h2, "other", "blue")
	pingEventually(t, h2, "other", ip1)
	pingEventually(t, h2, "other", ip2)
	t.Logf("projA_blue removed, plugin restarted: projB_blue's containers %s and %s reachable from h2", ip1, ip2)

	// The overlay goes with the last network of the last host.
	removeAll(t, h1, []string{"keep1", "keep2"}, []string{"projB_blue"})
	if !storeHas(t, st, driver.OverlayKey("shared")) {
		t.Fatal("overlay shared removed while h2's network still uses it")
	}
	removeAll(t, h2, []string{"other"}, []string{"blue"})
	waitFor(t, 10*time.Second, "overlay shared removed from the store", func() bool { return !storeHas(t, st, driver.OverlayKey("shared")) })
}

func testBadRecord(t *testing.T, c *harness.Cluster, url string, st store.Store, plugins map[*harness.Host]*plugin) {
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	const mac = "02:00:00:00:aa:01"
	for _, h := range c.Hosts {
		h := h
		t.Cleanup(func() { removeAll(t, h, []string{"m1", "m2", "fresh2", "fresh3", "clash"}, []string{"macs"}) })
		if err := dnpNet(h, "macs", "10.83.0.0/24", "-o", "overlay=macs"); err != nil {
			t.Fatal(err)
		}
	}
	ipM1 := runContainer(t, h1, "m1", "macs", "--mac-address", mac)
	ep1 := h1.MustDocker(t, "inspect", "-f", "{{.NetworkSettings.Networks.macs.EndpointID}}", "m1")

	// The same MAC on another host of the overlay: refused, naming the holder.
	_, err := h2.Docker("run", "-d", "--init", "--name", "clash", "--network", "macs", "--mac-address", mac, harness.Image, "sleep", "3600")
	if err == nil || !strings.Contains(err.Error(), mac) || !strings.Contains(err.Error(), h1.UnderlayIP) {
		t.Fatalf("docker run on h2 with the MAC of m1 on h1: %v; want it refused naming %s and %s", err, mac, h1.UnderlayIP)
	}
	t.Logf("duplicate MAC refused: %v", err)
	h2.Docker("rm", "-f", "clash")

	// A conflicting record that gets into the store anyway (an earlier
	// version, another tool): h2 claims m1's MAC for an endpoint that
	// does not exist. Its key sorts after m1's: m1 keeps the MAC.
	netID2 := h2.MustDocker(t, "network", "inspect", "-f", "{{.Id}}", "macs")
	bad := strings.Repeat("f", 64)
	badKey := driver.EndpointKey("macs", bad)
	rec, _ := json.Marshal(map[string]string{"network": netID2, "host": h2.UnderlayIP, "ipv4": "10.83.0.250/24", "mac": mac})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := st.Put(ctx, badKey, rec); err != nil {
		t.Fatal(err)
	}
	// The rest of the overlay keeps converging: fresh containers on h2 and
	// h3 reach each other and m1.
	ip2 := runContainer(t, h2, "fresh2", "macs")
	runContainer(t, h3, "fresh3", "macs")
	pingEventually(t, h3, "fresh3", ip2)
	pingEventually(t, h3, "fresh3", ipM1)
	pingEventually(t, h2, "fresh2", ipM1)
	t.Logf("with a conflicting record in the store, h3 reaches a fresh container on h2 (%s) and m1 (%s)", ip2, ipM1)

	// Shown in status, doctor and the metrics; logged once.
	bin := harness.PluginBinary(t)
	out, code := cli(t, exec.Command(bin, "status", "--store", url, "--json"))
	if code != 0 {
		t.Fatalf("status --json exited %d:\n%s", code, out)
	}
	var cs driver.ClusterState
	if err := json.Unmarshal([]byte(out), &cs); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if len(cs.Problems) != 1 || cs.Problems[0].Endpoint != bad || cs.Problems[0].ConflictsWith != ep1 {
		t.Errorf("status problems %+v; want the record %s, conflicting with m1's endpoint %s", cs.Problems, bad, ep1)
	}
	table, _ := cli(t, exec.Command(bin, "status", "--store", url))
	if !strings.Contains(table, "PROBLEMS") || !strings.Contains(table, bad[:12]) {
		t.Errorf("status table does not show the skipped record:\n%s", table)
	}
	t.Logf("status:\n%s", table)
	doc, code := cli(t, h3.Command(bin, "doctor", "--store", url, "--advertise-addr", h3.UnderlayIP, "--netns-prefix", c.Prefix+"-"+h3.Name+"-"))
	if code == 0 || !strings.Contains(doc, bad[:12]) || !strings.Contains(doc, mac) {
		t.Errorf("doctor on h3 exited %d without naming the skipped record:\n%s", code, doc)
	}
	t.Logf("doctor on h3:\n%s", doc)
	m := scrapeMetrics(t, h3)
	if got := m[`dnp_endpoint_records_skipped{reason="conflict"}`]; got != 1 {
		t.Errorf("h3 metrics: dnp_endpoint_records_skipped{reason=\"conflict\"} = %v, want 1\n%s", got, grepLines(rawMetrics(t, h3), "dnp_endpoint_records", 10))
	}
	logged := 0
	for _, l := range logLines(t, plugins[h3].Log) {
		if strings.Contains(l, "endpoint record skipped") && strings.Contains(l, bad[:12]) {
			logged++
		}
	}
	if logged != 1 {
		t.Errorf("h3 logged the skipped record %d times, want once", logged)
	}

	// Once the record goes, nothing is skipped any more.
	if err := st.Delete(ctx, badKey); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "h3 skips nothing any more", func() bool {
		return scrapeMetrics(t, h3)[`dnp_endpoint_records_skipped{reason="conflict"}`] == 0
	})
}

func testForeignIPAM(t *testing.T, c *harness.Cluster) {
	h1, h2 := c.Hosts[0], c.Hosts[1]
	const subnet = "10.88.0.0/24"
	t.Cleanup(func() {
		for _, h := range []*harness.Host{h1, h2} {
			removeAll(t, h, []string{"f1", "f2", "steal"}, []string{"fip", "fip2"})
		}
	})
	// What users typed with the cluster store: no --ipam-driver.
	_, err := h1.Docker("network", "create", "-d", pluginName, "--subnet", subnet, "-o", "overlay=fip", "fip")
	if err == nil || !strings.Contains(err.Error(), "--ipam-driver") || !strings.Contains(err.Error(), "ipam:") {
		t.Fatalf("network without --ipam-driver: %v; want it refused, saying what to type instead", err)
	}
	t.Logf("refused: %v", err)

	// Opted in: each host declares a disjoint range; an overlapping one is
	// refused naming the host that has it.
	optIn := func(h *harness.Host, name, rng string) error {
		_, err := h.Docker("network", "create", "-d", pluginName, "--subnet", subnet, "--ip-range", rng,
			"-o", "overlay=fip", "-o", "uncoordinated-ipam-range="+rng, name)
		return err
	}
	if err := optIn(h1, "fip", "10.88.0.0/25"); err != nil {
		t.Fatal(err)
	}
	err = optIn(h2, "fip2", "10.88.0.64/26")
	if err == nil || !strings.Contains(err.Error(), "10.88.0.0/25") || !strings.Contains(err.Error(), h1.UnderlayIP) {
		t.Fatalf("h2 declaring a range overlapping h1's: %v; want it refused naming h1 and its range", err)
	}
	t.Logf("overlapping range refused: %v", err)
	if err := optIn(h2, "fip", "10.88.0.128/25"); err != nil {
		t.Fatal(err)
	}
	ip1 := runContainer(t, h1, "f1", "fip")
	ip2 := runContainer(t, h2, "f2", "fip")
	if ip1 == ip2 {
		t.Fatalf("both hosts gave %s", ip1)
	}
	pingEventually(t, h2, "f2", ip1)
	t.Logf("uncoordinated IPAM with disjoint ranges: h1 gave %s, h2 gave %s; they reach each other", ip1, ip2)

	// An address another host holds: refused on docker run, naming it.
	_, err = h2.Docker("run", "-d", "--init", "--name", "steal", "--network", "fip", "--ip", ip1, harness.Image, "sleep", "3600")
	if err == nil || !strings.Contains(err.Error(), ip1) || !strings.Contains(err.Error(), h1.UnderlayIP) {
		t.Fatalf("docker run on h2 with h1's address %s: %v; want it refused naming %s", ip1, err, h1.UnderlayIP)
	}
	t.Logf("address held by another host refused: %v", err)
}

func testInput(t *testing.T, c *harness.Cluster) {
	h1, h2 := c.Hosts[0], c.Hosts[1]
	t.Cleanup(func() {
		for _, h := range []*harness.Host{h1, h2} {
			removeAll(t, h, nil, []string{"mtu", "big", "dots"})
		}
	})
	for _, tc := range []struct {
		h      *harness.Host
		name   string
		args   []string
		refuse string // "" when it must succeed
	}{
		// The harness underlay has MTU 1500: VXLAN over IPv4 leaves 1450.
		{h1, "big", []string{"-o", "overlay=big", "-o", "mtu=1451"}, "1450"},
		{h1, "mtu", []string{"-o", "overlay=mtu", "-o", "mtu=1400"}, ""},
		{h2, "mtu", []string{"-o", "overlay=mtu", "-o", "mtu=1300"}, "1400"},
		{h2, "mtu", []string{"-o", "overlay=mtu"}, ""}, // inherits 1400
		{h1, "dots", []string{"-o", "overlay=.."}, "overlay"},
		{h1, "dots", []string{"-o", "overlay=a/b"}, "overlay"},
	} {
		err := dnpNet(tc.h, tc.name, "10.84.0.0/24", tc.args...)
		switch {
		case tc.refuse == "" && err != nil:
			t.Errorf("%s: create %s %v: %v", tc.h.Name, tc.name, tc.args, err)
		case tc.refuse != "" && (err == nil || !strings.Contains(err.Error(), tc.refuse)):
			t.Errorf("%s: create %s %v: %v; want it refused, naming %s", tc.h.Name, tc.name, tc.args, err, tc.refuse)
		case err != nil:
			t.Logf("refused as expected: %v", err)
		}
	}
	runContainer(t, h2, "mtu2", "mtu")
	defer h2.Docker("rm", "-f", "mtu2")
	if got := h2.MustDocker(t, "exec", "mtu2", "cat", "/sys/class/net/eth0/mtu"); got != "1400" {
		t.Errorf("container on h2's network of overlay mtu (created with mtu=1400 on h1): MTU %s, want 1400", got)
	}
}
