package integration

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// metricsPort is where each host's plugin serves /metrics, on its
// underlay address.
const metricsPort = "9477"

// TestOperatorTools: what an operator sees, on three hosts sharing etcd.
// status lists exactly the hosts, overlays and endpoints the test made;
// doctor is clean, then reports a deleted forwarding entry, a stray VXLAN
// device and a stray overlay namespace, --fix repairs them and doctor is
// clean again; each host's metrics count the calls the test made; logs
// name networks and endpoints and say nothing per watch event at info.
func TestOperatorTools(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	url, _ := kvServer(t, c, "etcd")
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	plugins := map[*harness.Host]*plugin{}
	for _, h := range c.Hosts {
		extra := []string{"--metrics-addr", h.UnderlayIP + ":" + metricsPort}
		if h == h3 {
			extra = append(extra, "--log-format", "json", "--log-level", "info")
		}
		plugins[h] = startPlugin(t, c, h, url, extra...)
	}
	before := scrapeMetrics(t, h1)

	netCreate := func(h *harness.Host, name, subnet string, extra ...string) error {
		args := append([]string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", subnet, "-o", "overlay=" + name}, extra...)
		_, err := h.Docker(append(args, name)...)
		return err
	}
	for _, h := range c.Hosts {
		if err := netCreate(h, "blue", "10.60.0.0/24"); err != nil {
			t.Fatal(err)
		}
	}
	for _, h := range []*harness.Host{h1, h2} {
		if err := netCreate(h, "red", "10.61.0.0/24", "-o", "mtu=1400"); err != nil {
			t.Fatal(err)
		}
	}
	// One refused network: overlay blue again, with another subnet.
	if _, err := h1.Docker("network", "create", "-d", pluginName, "--ipam-driver", pluginName,
		"--subnet", "10.62.0.0/24", "-o", "overlay=blue", "blue2"); err == nil {
		t.Fatal("a second network on overlay blue with another subnet was accepted")
	} else {
		t.Logf("refused as expected: %v", err)
	}

	type ep struct{ overlay, host, id, ip, mac string }
	var want []ep
	run := func(h *harness.Host, name, network string) {
		runContainer(t, h, name, network)
		f := func(field string) string {
			return h.MustDocker(t, "inspect", "-f", fmt.Sprintf("{{(index .NetworkSettings.Networks %q).%s}}", network, field), name)
		}
		want = append(want, ep{network, h.UnderlayIP, f("EndpointID"), f("IPAddress") + "/24", f("MacAddress")})
	}
	for _, h := range c.Hosts {
		run(h, "blue-"+h.Name, "blue")
	}
	run(h1, "red-h1", "red")
	run(h2, "red-h2", "red")
	pingEventually(t, h1, "blue-h1", strings.TrimSuffix(want[1].ip, "/24"))

	// status: exactly what the test made.
	bin := harness.PluginBinary(t)
	out, code := cli(t, exec.Command(bin, "status", "--store", url, "--json"))
	if code != 0 {
		t.Fatalf("status --json exited %d:\n%s", code, out)
	}
	var cs driver.ClusterState
	if err := json.Unmarshal([]byte(out), &cs); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	var hosts []string
	for _, h := range cs.Hosts {
		hosts = append(hosts, h.Address)
		if !h.Alive || h.LastSeen.IsZero() || time.Since(h.LastSeen) > 2*time.Minute {
			t.Errorf("status: host %s: alive %v, last seen %v; want alive and seen just now", h.Address, h.Alive, h.LastSeen)
		}
	}
	if want := []string{h1.UnderlayIP, h2.UnderlayIP, h3.UnderlayIP}; !slices.Equal(hosts, want) {
		t.Errorf("status hosts %v, want %v", hosts, want)
	}
	var got []ep
	overlays := map[string]driver.OverlayInfo{}
	for _, ov := range cs.Overlays {
		overlays[ov.Name] = ov
		for _, e := range ov.Endpoints {
			got = append(got, ep{ov.Name, e.Host, e.ID, e.IPv4, e.MAC})
		}
	}
	if len(cs.Overlays) != 2 || overlays["blue"].VNI == 0 || overlays["red"].VNI == 0 ||
		!slices.Equal(overlays["blue"].Subnets, []string{"10.60.0.0/24"}) || overlays["blue"].MTU != 0 || len(overlays["blue"].Hosts) != 3 ||
		!slices.Equal(overlays["red"].Subnets, []string{"10.61.0.0/24"}) || overlays["red"].MTU != 1400 || len(overlays["red"].Hosts) != 2 {
		t.Errorf("status overlays: %+v", cs.Overlays)
	}
	key := func(e ep) string { return e.overlay + " " + e.host + " " + e.ip + " " + e.id + " " + e.mac }
	gotKeys, wantKeys := mapSorted(got, key), mapSorted(want, key)
	if !slices.Equal(gotKeys, wantKeys) {
		t.Errorf("status endpoints:\n%s\nwant (from docker inspect):\n%s", strings.Join(gotKeys, "\n"), strings.Join(wantKeys, "\n"))
	}
	table, code := cli(t, exec.Command(bin, "status", "--store", url))
	if code != 0 {
		t.Fatalf("status exited %d:\n%s", code, table)
	}
	for _, e := range want {
		if !strings.Contains(table, e.ip) || !strings.Contains(table, e.mac) {
			t.Errorf("status table lacks endpoint %s %s:\n%s", e.ip, e.mac, table)
		}
	}
	t.Logf("docker-net-plugin status --store %s:\n%s", url, table)
	t.Logf("docker-net-plugin status --json:\n%s", out)

	// doctor: clean on every host.
	doctor := func(h *harness.Host, extra ...string) (string, int) {
		args := append([]string{"doctor", "--store", url, "--advertise-addr", h.UnderlayIP,
			"--netns-prefix", c.Prefix + "-" + h.Name + "-"}, extra...)
		return cli(t, h.Command(bin, args...))
	}
	for _, h := range c.Hosts {
		out, code := doctor(h)
		if code != 0 || !strings.Contains(out, "no problems found") {
			t.Fatalf("doctor on %s before any damage exited %d:\n%s", h.Name, code, out)
		}
		if h == h1 {
			t.Logf("docker-net-plugin doctor on h1, healthy:\n%s", out)
		}
	}

	// Damage h1: delete the forwarding entry for blue-h2's MAC, add a VXLAN
	// device the plugin did not make to blue's namespace, and add an
	// overlay namespace nothing uses.
	blueNS := filepath.Join("/run/netns", c.Prefix+"-h1-"+strconv.FormatUint(uint64(overlays["blue"].VNI), 10))
	mac2 := want[1].mac
	if out, err := harness.ExecIn(blueNS, "bridge", "fdb", "del", mac2, "dev", "vxlan0", "dst", h2.UnderlayIP, "self"); err != nil {
		t.Fatalf("delete fdb entry: %v %s", err, out)
	}
	if out, err := harness.ExecIn(blueNS, "ip", "link", "add", "stray0", "type", "vxlan", "id", "4242", "dstport", "4789"); err != nil {
		t.Fatalf("add stray vxlan device: %v %s", err, out)
	}
	strayNS := c.Prefix + "-h1-99999"
	if out, err := exec.Command("ip", "netns", "add", strayNS).CombinedOutput(); err != nil {
		t.Fatalf("add stray namespace: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", strayNS).Run() })

	out, code = doctor(h1)
	t.Logf("docker-net-plugin doctor on h1, damaged (exit %d):\n%s", code, out)
	if code == 0 {
		t.Errorf("doctor exited 0 on a damaged host")
	}
	for _, s := range []string{
		"forwarding (bridge fdb) entry missing: " + mac2 + " dst " + h2.UnderlayIP + " self permanent",
		"stray vxlan device stray0",
		"stray overlay namespace /run/netns/" + strayNS,
		"3 problem(s) found",
	} {
		if !strings.Contains(out, s) {
			t.Errorf("doctor output lacks %q", s)
		}
	}

	out, code = doctor(h1, "--fix")
	t.Logf("docker-net-plugin doctor --fix on h1 (exit %d):\n%s", code, out)
	if code != 0 {
		t.Errorf("doctor --fix exited %d", code)
	}
	out, code = doctor(h1)
	if code != 0 || !strings.Contains(out, "no problems found") {
		t.Errorf("doctor after --fix exited %d:\n%s", code, out)
	}
	fdb, err := harness.ExecIn(blueNS, "bridge", "fdb", "show", "dev", "vxlan0")
	if err != nil || !slices.ContainsFunc(strings.Split(fdb, "\n"), func(l string) bool {
		return strings.HasPrefix(l, mac2+" dst "+h2.UnderlayIP+" ") && strings.HasSuffix(l, " self permanent")
	}) {
		t.Errorf("forwarding entry for %s not back after --fix (%v):\n%s", mac2, err, fdb)
	}
	if links, _ := harness.ExecIn(blueNS, "ip", "-o", "link", "show"); strings.Contains(links, "stray0") {
		t.Errorf("stray0 still there after --fix:\n%s", links)
	}
	if _, err := os.Stat("/run/netns/" + strayNS); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stray namespace still there after --fix: %v", err)
	}
	pingEventually(t, h1, "blue-h1", strings.TrimSuffix(want[1].ip, "/24"))

	// Metrics: h1's counters went up by exactly the calls the test made
	// there: 2 networks made and 1 refused, 2 containers (one endpoint and
	// join each), then one container removed.
	h1.MustDocker(t, "rm", "-f", "red-h1")
	waitFor(t, 10*time.Second, "h1's endpoint gauges settle", func() bool {
		m := scrapeMetrics(t, h1)
		return m[`dnp_endpoints_known{location="local"}`] == 1 && m[`dnp_endpoints_known{location="remote"}`] == 3
	})
	after := scrapeMetrics(t, h1)
	delta := func(k string) float64 { return after[k] - before[k] }
	calls := func(method, result string) string {
		return fmt.Sprintf(`dnp_plugin_calls_total{method="%s",result="%s"}`, method, result)
	}
	for k, v := range map[string]float64{
		calls("NetworkDriver.CreateNetwork", "ok"):                            2,
		calls("NetworkDriver.CreateNetwork", "error"):                         1,
		calls("NetworkDriver.CreateEndpoint", "ok"):                           2,
		calls("NetworkDriver.Join", "ok"):                                     2,
		calls("NetworkDriver.Leave", "ok"):                                    1,
		calls("NetworkDriver.DeleteEndpoint", "ok"):                           1,
		calls("IpamDriver.RequestPool", "ok"):                                 3,
		calls("IpamDriver.ReleasePool", "ok"):                                 1,
		`dnp_plugin_call_duration_seconds_count{method="NetworkDriver.Join"}`: 2,
	} {
		if d := delta(k); d != v {
			t.Errorf("h1 metric %s went up by %v, want %v", k, d, v)
		}
	}
	if after[`dnp_hosts_known`] != 3 || after[`dnp_reconcile_runs_total{result="ok"}`] == 0 ||
		after[`dnp_store_operation_duration_seconds_count{op="txn"}`] == 0 {
		t.Errorf("h1 metrics: hosts %v, reconcile runs %v, store transactions %v; want 3 and some",
			after[`dnp_hosts_known`], after[`dnp_reconcile_runs_total{result="ok"}`], after[`dnp_store_operation_duration_seconds_count{op="txn"}`])
	}
	for _, dir := range []string{driver.EndpointsDir, driver.HostsDir} {
		if v := after[fmt.Sprintf(`dnp_store_watch_reconnects_total{dir="%s"}`, dir)]; v != 0 {
			t.Errorf("watch of %s reconnected %v times with etcd up all along", dir, v)
		}
	}
	raw := rawMetrics(t, h1)
	t.Logf("metrics of h1 (dnp_ lines, without histogram buckets):\n%s", grepLines(raw, "dnp_", 200))

	// Logs: h3 logs JSON at info; every line about an endpoint names its
	// network and endpoint, and watch events from other hosts log nothing.
	p3 := plugins[h3]
	lines := logLines(t, p3.Log)
	n := len(lines)
	run(h1, "blue-h1b", "blue")
	waitFor(t, 20*time.Second, "h3 programs h1's new endpoint", func() bool {
		fdb, _ := harness.ExecIn(filepath.Join("/run/netns", c.Prefix+"-h3-"+strconv.FormatUint(uint64(overlays["blue"].VNI), 10)),
			"bridge", "fdb", "show", "dev", "vxlan0")
		return strings.Contains(fdb, want[len(want)-1].mac)
	})
	if more := logLines(t, p3.Log)[n:]; len(more) != 0 {
		t.Errorf("h3 logged at info about another host's new endpoint:\n%s", strings.Join(more, "\n"))
	}
	joined := 0
	for _, l := range lines {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("h3 log line is not JSON: %q", l)
			continue
		}
		if rec["level"] == "DEBUG" {
			t.Errorf("debug line at --log-level info: %q", l)
		}
		if strings.HasPrefix(fmt.Sprint(rec["msg"]), "endpoint ") {
			joined++
			if rec["network"] == nil || rec["endpoint"] == nil {
				t.Errorf("endpoint log line without network and endpoint ids: %s", l)
			}
		}
	}
	if joined == 0 {
		t.Errorf("h3 logged no endpoint lines:\n%s", strings.Join(lines, "\n"))
	}
	t.Logf("h3 plugin log (JSON, info):\n%s", strings.Join(lines, "\n"))

	// h3's plugin stops: status shows it dead, with when it was last seen;
	// back, it is alive again.
	p3.Stop()
	out, code = cli(t, exec.Command(bin, "status", "--store", url, "--json"))
	cs = driver.ClusterState{}
	if err := json.Unmarshal([]byte(out), &cs); err != nil || code != 0 {
		t.Fatalf("status --json exited %d: %v\n%s", code, err, out)
	}
	if len(cs.Hosts) != 3 || cs.Hosts[2].Alive || cs.Hosts[2].LastSeen.IsZero() || time.Since(cs.Hosts[2].LastSeen) > time.Minute {
		t.Errorf("status after h3's plugin stopped: %+v; want h3 not alive, last seen just now", cs.Hosts)
	}
	table, _ = cli(t, exec.Command(bin, "status", "--store", url))
	t.Logf("docker-net-plugin status with h3's plugin stopped:\n%s", table)
	p3.Start(t)
	waitFor(t, 10*time.Second, "h3 alive again", func() bool {
		out, _ := cli(t, exec.Command(bin, "status", "--store", url, "--json"))
		cs := driver.ClusterState{}
		return json.Unmarshal([]byte(out), &cs) == nil && len(cs.Hosts) == 3 && cs.Hosts[2].Alive
	})

	// Remove everything while the plugins run (teardown is quicker when
	// no dockerd has networks of a plugin that is gone).
	for _, h := range c.Hosts {
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		for _, n := range []string{"blue", "red"} {
			if _, err := h.Docker("network", "inspect", n); err == nil {
				h.MustDocker(t, "network", "rm", n)
			}
		}
	}
	out, _ = cli(t, exec.Command(bin, "status", "--store", url))
	t.Logf("docker-net-plugin status after everything was removed:\n%s", out)
}

// cli runs an operator command and returns its combined output and exit code.
func cli(t *testing.T, cmd *exec.Cmd) (string, int) {
	t.Helper()
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee):
		return string(out), ee.ExitCode()
	}
	t.Fatalf("run %v: %v", cmd.Args, err)
	return "", -1
}

func rawMetrics(t *testing.T, h *harness.Host) string {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + h.UnderlayIP + ":" + metricsPort + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", h.Name, err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		b.WriteString(sc.Text() + "\n")
	}
	if err := sc.Err(); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v", h.Name, resp.Status, err)
	}
	return b.String()
}

// scrapeMetrics reads a host's metrics as "name{labels}" -> value.
func scrapeMetrics(t *testing.T, h *harness.Host) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, line := range strings.Split(rawMetrics(t, h), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func logLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

func grepLines(s, prefix string, max int) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if (strings.HasPrefix(l, prefix) || strings.HasPrefix(l, "# HELP "+prefix)) && !strings.Contains(l, "_bucket{") {
			out = append(out, l)
		}
	}
	return head(strings.Join(out, "\n"), max)
}

func head(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, "\n")
}

func mapSorted[T any](s []T, f func(T) string) []string {
	out := make([]string, len(s))
	for i, v := range s {
		out[i] = f(v)
	}
	slices.Sort(out)
	return out
}
