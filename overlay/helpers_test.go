package overlay_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// testHost is one simulated host: a network namespace on a test underlay
// with an overlay.Host working in it.
type testHost struct {
	ns   *testenv.NetNS
	ip   netip.Addr
	host *overlay.Host
}

// newHosts makes n hosts on one underlay. Their overlay namespaces get a
// prefix unique to this test run and are deleted when the test ends.
func newHosts(t *testing.T, n int) []*testHost {
	t.Helper()
	testenv.NeedRoot(t)
	testenv.LookPath(t, "ip")
	testenv.LookPath(t, "bridge")
	testenv.LookPath(t, "busybox")
	u := testenv.NewUnderlay(t, n)
	prefix := testenv.RandomName("dnpt")
	var hosts []*testHost
	for i := range n {
		h := &testHost{
			ns:   u.Hosts[i],
			ip:   u.Addrs[i],
			host: &overlay.Host{NetNS: u.Hosts[i].Path(), Prefix: fmt.Sprintf("%s-%d-", prefix, i+1)},
		}
		hosts = append(hosts, h)
		t.Cleanup(func() {
			ids, err := h.host.ListNetworks()
			if err != nil {
				t.Errorf("cleanup: %v", err)
			}
			for _, id := range ids {
				if err := h.host.DeleteNetwork(id); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		})
	}
	return hosts
}

// ovName is the name (under /run/netns) of network id's namespace on h.
func (h *testHost) ovName(id string) string { return h.host.Prefix + id }

// ovIP runs `ip -n <overlay ns> args...`.
func (h *testHost) ovIP(t *testing.T, id string, args ...string) string {
	t.Helper()
	return mustRun(t, "ip", append([]string{"-n", h.ovName(id)}, args...)...)
}

// container makes a "container" namespace and moves the endpoint's host
// end into it as eth0 with the given addresses, as libnetwork would.
func container(t *testing.T, h *testHost, hostIf string, addrs ...string) *testenv.NetNS {
	t.Helper()
	c := testenv.NewNetNS(t, "tc")
	h.ns.IP("link", "set", hostIf, "netns", c.Name)
	c.IP("link", "set", hostIf, "name", "eth0")
	for _, a := range addrs {
		args := []string{"addr", "add", a, "dev", "eth0"}
		if strings.Contains(a, ":") {
			args = append(args, "nodad")
		}
		c.IP(args...)
	}
	c.IP("link", "set", "eth0", "up")
	return c
}

// ping sends one echo request from c to ip and waits a second for the reply.
func ping(c *testenv.NetNS, ip string) error {
	out, err := c.Exec("busybox", "ping", "-c", "1", "-W", "1", ip)
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v: %s", ip, c.Name, err, out)
	}
	return nil
}

// mustPing fails the test unless c reaches ip (three tries, for ARP/ND).
func mustPing(t *testing.T, c *testenv.NetNS, ip string) {
	t.Helper()
	var err error
	for range 3 {
		if err = ping(c, ip); err == nil {
			return
		}
	}
	t.Fatalf("%v", err)
}

// mustNotPing fails the test if c reaches ip.
func mustNotPing(t *testing.T, c *testenv.NetNS, ip string) {
	t.Helper()
	if err := ping(c, ip); err == nil {
		t.Fatalf("ping %s from %s worked, want no connectivity", ip, c.Name)
	}
}

type ipLink struct {
	Index   int    `json:"ifindex"`
	Name    string `json:"ifname"`
	MTU     int    `json:"mtu"`
	Address string `json:"address"`
	Master  string `json:"master"`
	Flags   []string
}

// link reads a device with `ip -j`; ok is false if there is none.
func link(t *testing.T, nsName, dev string) (l ipLink, ok bool) {
	t.Helper()
	out, err := run("ip", "-j", "-n", nsName, "link", "show", "dev", dev)
	if err != nil {
		if strings.Contains(out, "does not exist") {
			return ipLink{}, false
		}
		t.Fatalf("ip -n %s link show %s: %v: %s", nsName, dev, err, out)
	}
	var ls []ipLink
	if err := json.Unmarshal([]byte(out), &ls); err != nil || len(ls) != 1 {
		t.Fatalf("parse ip -j output %q: %v", out, err)
	}
	return ls[0], true
}

func (l ipLink) up() bool {
	for _, f := range l.Flags {
		if f == "UP" {
			return true
		}
	}
	return false
}

func mustRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := run(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

func mac(t *testing.T, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// fdbSelf lists the VXLAN device's own FDB entries as strings.
func fdbSelf(t *testing.T, n *overlay.Network) []string {
	t.Helper()
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range st.FDB {
		if e.Self {
			out = append(out, e.String())
		}
	}
	return out
}

// permanentNeigh lists the bridge's permanent neighbour entries as strings.
func permanentNeigh(t *testing.T, n *overlay.Network) []string {
	t.Helper()
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range st.Neigh {
		if e.State == "permanent" {
			out = append(out, e.String())
		}
	}
	return out
}
