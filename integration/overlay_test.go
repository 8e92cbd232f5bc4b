package integration

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestOverlayAcrossHosts is the product's promise, on each real store:
// three Docker hosts, one overlay; containers on different hosts reach each
// other without NAT and see their own address; another overlay is isolated;
// egress goes out through the container's own host with NAT unless the
// network is --internal; removing everything leaves nothing behind.
func TestOverlayAcrossHosts(t *testing.T) {
	for _, kind := range []string{"etcd", "consul", "zk"} {
		t.Run(kind, func(t *testing.T) { testOverlayAcrossHosts(t, kind) })
	}
}

func testOverlayAcrossHosts(t *testing.T, kind string) {
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, kind)
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url)
	}
	netCreate := func(h *harness.Host, name, subnet string, extra ...string) {
		args := append([]string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", subnet, "-o", "overlay=" + name}, extra...)
		h.MustDocker(t, append(args, name)...)
	}

	// One overlay "blue" on every host, a container on each.
	ips := map[string]string{}
	for _, h := range c.Hosts {
		netCreate(h, "blue", "10.20.0.0/24")
		ips[h.Name] = runContainer(t, h, "blue-"+h.Name, "blue")
	}
	if len(uniq(values(ips))) != len(c.Hosts) {
		t.Fatalf("containers on different hosts got the same address: %v", ips)
	}
	for _, h := range c.Hosts {
		// The container sees its own address (no NAT inside the overlay) and
		// the overlay MTU (underlay 1500 minus 50 for VXLAN).
		out := h.MustDocker(t, "exec", "blue-"+h.Name, "ip", "-o", "addr", "show", "dev", "eth0")
		if !strings.Contains(out, " "+ips[h.Name]+"/24 ") {
			t.Errorf("%s: container does not see its own address %s: %s", h.Name, ips[h.Name], out)
		}
		if mtu := h.MustDocker(t, "exec", "blue-"+h.Name, "cat", "/sys/class/net/eth0/mtu"); mtu != "1450" {
			t.Errorf("%s: container MTU %s, want 1450", h.Name, mtu)
		}
	}
	for _, from := range c.Hosts {
		for _, to := range c.Hosts {
			if from != to {
				pingEventually(t, from, "blue-"+from.Name, ips[to.Name])
			}
		}
	}
	t.Logf("blue: every pair of %d hosts pings both ways: %v", len(c.Hosts), ips)

	// A second overlay works on its own but cannot reach blue, on the same
	// host or another.
	h1, h2 := c.Hosts[0], c.Hosts[1]
	red := map[string]string{}
	for _, h := range []*harness.Host{h1, h2} {
		netCreate(h, "red", "10.30.0.0/24")
		red[h.Name] = runContainer(t, h, "red-"+h.Name, "red")
	}
	pingEventually(t, h1, "red-h1", red["h2"])
	for _, target := range []string{ips["h1"], ips["h2"]} {
		if ok, out := ping(h1, "red-h1", target); ok {
			t.Errorf("red container on h1 reached blue %s: %s", target, out)
		}
	}

	// Egress: through the container's own host, with NAT: the outside world
	// (the underlay switch) sees the host's address, not the container's.
	pingEventually(t, h1, "blue-h1", c.SwitchIP)
	if src := sourceSeenBySwitch(t, c, h1, "blue-h1"); src != h1.UnderlayIP {
		t.Errorf("the outside saw a connection from %s, want h1's underlay address %s (NAT)", src, h1.UnderlayIP)
	}

	// --internal: the overlay still spans hosts, but there is no way out.
	for _, h := range []*harness.Host{h1, h2} {
		netCreate(h, "inner", "10.40.0.0/24", "--internal")
		red["inner-"+h.Name] = runContainer(t, h, "inner-"+h.Name, "inner")
	}
	pingEventually(t, h1, "inner-h1", red["inner-h2"])
	if ok, out := ping(h1, "inner-h1", c.SwitchIP); ok {
		t.Errorf("container on an --internal network reached the outside: %s", out)
	}

	// Everything goes; nothing stays.
	for _, h := range c.Hosts {
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		for _, n := range []string{"blue", "red", "inner"} {
			if _, err := h.Docker("network", "inspect", n); err == nil {
				if err := networkRm(h, n); err != nil {
					t.Error(err)
				}
			}
		}
	}
	for _, h := range c.Hosts {
		waitFor(t, 15*time.Second, h.Name+": overlay namespaces removed", func() bool {
			return len(overlayNamespaces(t, c, h)) == 0
		})
		assertNoPluginLeftovers(t, h, "10.20.0", "10.30.0", "10.40.0")
	}
	waitFor(t, 10*time.Second, "store emptied", func() bool { return len(storeKeys(t, st)) == 0 })
	if left := storeKeys(t, st); len(left) > 0 {
		t.Errorf("store keys left after every network was removed: %v", left)
	}
}

// sourceSeenBySwitch opens a TCP listener in the switch namespace, has the
// container connect to it, and returns the source address it saw.
func sourceSeenBySwitch(t *testing.T, c *harness.Cluster, h *harness.Host, container string) string {
	t.Helper()
	var l net.Listener
	err := harness.DoIn(c.SwitchNetNS, func() error {
		var err error
		l, err = net.Listen("tcp", c.SwitchIP+":0")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	seen := make(chan string, 1)
	go func() {
		conn, err := l.Accept()
		if err != nil {
			seen <- "accept: " + err.Error()
			return
		}
		defer conn.Close()
		host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
		seen <- host
	}()
	port := l.Addr().(*net.TCPAddr).Port
	if out, err := h.Docker("exec", container, "sh", "-c", fmt.Sprintf("echo hi | nc -w 2 %s %d", c.SwitchIP, port)); err != nil {
		t.Fatalf("connect out from %s: %v %s", container, err, out)
	}
	select {
	case src := <-seen:
		return src
	case <-time.After(5 * time.Second):
		t.Fatal("the switch saw no connection")
	}
	return ""
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", d, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func values(m map[string]string) []string {
	var out []string
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

func uniq(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return slices.Compact(s)
}
