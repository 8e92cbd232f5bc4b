package integration

import (
	"context"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// pluginName is the legacy plugin's name: -d and --ipam-driver.
const pluginName = harness.PluginName

// plugin is the plugin of one host, run as a legacy plugin.
type plugin = harness.LegacyPlugin

// startPlugin runs the plugin on h; see harness.StartLegacyPlugin.
func startPlugin(t testing.TB, c *harness.Cluster, h *harness.Host, storeURL string, extra ...string) *plugin {
	t.Helper()
	return harness.StartLegacyPlugin(t, c, h, storeURL, extra...)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// kvServer starts a real store server of the given kind in the test's own
// namespace, on the underlay (c.RootIP) so every host reaches it,
// and returns its URL (with a per-cluster prefix) and a client for
// assertions.
func kvServer(t *testing.T, c *harness.Cluster, kind string) (string, store.Store) {
	t.Helper()
	_, url, st := kvServerProc(t, c, kind)
	return url, st
}

// kvServerProc is kvServer that also returns the server, for tests that
// stop and start it.
func kvServerProc(t *testing.T, c *harness.Cluster, kind string) (*testenv.Server, string, store.Store) {
	t.Helper()
	if err := c.AttachRoot(); err != nil {
		t.Fatal(err)
	}
	srv := testenv.StartServer(t, kind, testenv.ServerOptions{IP: c.RootIP})
	// Stop the server during the cluster's teardown, after the containers
	// and plugins are gone (not before, or every teardown call would wait
	// on store timeouts); its own t.Cleanup then has nothing left to do.
	c.Cleanup(func() { srv.Stop(t) })
	url := srv.URL("dnp-" + c.ID)
	st, err := stores.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return srv, url, st
}

// storeKeys lists every key the plugin keeps, for leak checks.
func storeKeys(t *testing.T, st store.Store) []string {
	t.Helper()
	var out []string
	for _, dir := range []string{driver.OverlaysDir, driver.VNIsDir, driver.NetmapDir, driver.EndpointsDir, driver.MACsDir, driver.AddrsDir, ipam.Dir} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		kvs, err := st.List(ctx, dir)
		cancel()
		if err != nil {
			t.Fatalf("list store %s: %v", dir, err)
		}
		for _, kv := range kvs {
			out = append(out, kv.Key)
		}
	}
	return out
}

// runContainer starts a long-lived container and returns its overlay IPv4.
func runContainer(t *testing.T, h *harness.Host, name, network string, extra ...string) string {
	t.Helper()
	args := append([]string{"run", "-d", "--init", "--name", name, "--network", network}, extra...)
	args = append(args, harness.Image, "sleep", "3600")
	h.MustDocker(t, args...)
	ip := h.MustDocker(t, "inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", name)
	if net.ParseIP(ip) == nil {
		t.Fatalf("container %s on %s has no IPv4 address: %q", name, network, ip)
	}
	return ip
}

// ping runs one ping from a container; it reports whether a reply came.
func ping(h *harness.Host, container, ip string) (bool, string) {
	out, err := h.Docker("exec", container, "ping", "-c", "1", "-W", "2", ip)
	return err == nil, strings.TrimSpace(out + " " + errString(err))
}

// pingEventually allows the peers a moment to converge (store watch).
func pingEventually(t *testing.T, h *harness.Host, container, ip string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		ok, out := ping(h, container, ip)
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s cannot ping %s: %s", container, h.Name, ip, out)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// overlayNamespaces lists the overlay namespaces of host h's plugin.
func overlayNamespaces(t *testing.T, c *harness.Cluster, h *harness.Host) []string {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), c.Prefix+"-"+h.Name+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

// networkRm removes a network, retrying while dockerd still finishes
// removing endpoints of containers it just removed (it releases their
// network resources asynchronously, after `docker rm -f` returned).
func networkRm(h *harness.Host, name string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := h.Docker("network", "rm", name)
		if err == nil || !strings.Contains(err.Error(), "active endpoints") || time.Now().After(deadline) {
			return err
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// assertNoPluginLeftovers checks h's own namespace for what the plugin
// might leave behind: endpoint veths ("dnp0123abcd-h") and iptables rules
// that name one of the subnets (the plugin installs none).
func assertNoPluginLeftovers(t *testing.T, h *harness.Host, subnets ...string) {
	t.Helper()
	links, err := h.Exec("ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(links, "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "dnp") && !strings.HasPrefix(f[1], "dnpt-") {
			t.Errorf("%s: plugin interface left in the host namespace: %s", h.Name, line)
		}
	}
	rules, err := h.Exec("iptables-save")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range subnets {
		if strings.Contains(rules, s) {
			t.Errorf("%s: iptables rules mention %s after removal:\n%s", h.Name, s, rules)
		}
	}
}
