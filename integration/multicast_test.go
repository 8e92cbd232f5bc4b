package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/mcast"
	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
)

// TestMulticast: multicast between containers of one overlay on three
// hosts (issue 16). Applications choose no interface: the route Join
// gives sends and joins through the overlay, not docker_gwbridge. A sender
// on host 1 reaches receivers on hosts 1, 2 and 3 over IPv4 and IPv6, and
// link-local groups (mDNS) too; nothing reaches another overlay or
// docker_gwbridge; a group goes only to the hosts with receivers.
func TestMulticast(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url)
	}
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	for _, h := range c.Hosts {
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--ipv6",
			"--subnet", "10.61.0.0/24", "--subnet", "fd00:61::/64", "-o", "overlay=mc", "mc")
	}
	h2.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
		"--subnet", "10.62.0.0/24", "-o", "overlay=mcred", "mcred")
	runContainer(t, h1, "s1", "mc")
	for _, h := range c.Hosts {
		runContainer(t, h, "r-"+h.Name, "mc")
	}
	runContainer(t, h2, "x2", "mcred") // on another overlay
	mcVNI := overlayVNI(t, st, "mc")

	t.Run("routes", func(t *testing.T) {
		// The default route goes out through docker_gwbridge (eth1), the
		// multicast route through the overlay (eth0).
		routes := h1.MustDocker(t, "exec", "r-h1", "ip", "route", "show")
		for _, want := range []string{"default via", "224.0.0.0/4 dev eth0"} {
			if !strings.Contains(routes, want) {
				t.Errorf("routes of a container lack %q:\n%s", want, routes)
			}
		}
		if !strings.Contains(lineWith(routes, "default"), "dev eth1") {
			t.Errorf("default route not through docker_gwbridge (eth1):\n%s", routes)
		}
		v6, _ := h1.Docker("exec", "r-h1", "ip", "-6", "route", "show", "table", "local")
		t.Logf("container routes:\n%s\nIPv6 local table:\n%s", routes, v6)
	})

	// Every receiver joins without naming an interface; one more on host 1
	// joins on docker_gwbridge (eth1), and one on another overlay.
	type stream struct {
		name  string
		group string
		count int
		recv  []*harness.Host // receivers r-<host>
	}
	g4, g6 := "239.61.0.1:6101", "[ff0e::61:1]:6102"
	streams := []stream{
		{name: "ipv4", group: g4, count: 2000, recv: c.Hosts},
		{name: "ipv6", group: g6, count: 2000, recv: c.Hosts},
		{name: "mdns-ipv4", group: "224.0.0.251:5353", count: 500, recv: c.Hosts},
		{name: "mdns-ipv6", group: "[ff02::fb]:5353", count: 500, recv: c.Hosts},
	}
	var rs []*mcReceiver
	byStream := map[string][]*mcReceiver{}
	for _, s := range streams {
		for _, h := range s.recv {
			r := startMcReceiver(t, h, "r-"+h.Name, s.name, s.group, s.count, "")
			byStream[s.name] = append(byStream[s.name], r)
			rs = append(rs, r)
		}
	}
	waitJoined(t, rs...)
	for _, r := range rs {
		if r.iface != "eth0" {
			t.Errorf("%s on %s joined %s on %s, want eth0 (the overlay)", r.stream, r.host.Name, r.group, r.iface)
		}
	}
	// Host 1 sends each group to hosts 2 and 3 (link-local IPv4 groups
	// are flooded and need no entry).
	for _, g := range []string{g4, g6, "[ff02::fb]:5353"} {
		group := netip.MustParseAddrPort(g).Addr()
		waitFor(t, 15*time.Second, "host 1 replicates "+group.String()+" to hosts 2 and 3", func() bool {
			dsts := vxlanMDBDsts(t, c, h1, mcVNI, group)
			return len(dsts) == 2 && dsts[h2.UnderlayIP] && dsts[h3.UnderlayIP]
		})
	}

	// Listening to the same group: on docker_gwbridge (eth1) on host 1, and
	// on another overlay on host 2. They stop 15 s after they start.
	gw := startMcReceiver(t, h1, "r-h1", "ipv4-gwbridge", g4, 0, "eth1")
	other := startMcReceiver(t, h2, "x2", "ipv4-other-overlay", g4, 0, "")
	waitJoined(t, gw, other)

	start := time.Now()
	var wg sync.WaitGroup
	for _, s := range streams {
		wg.Go(func() {
			out, err := h1.Docker("exec", "s1", harness.McastTool, "send", "-n", strconv.Itoa(s.count), "-rate", "200", s.group)
			if err != nil {
				t.Errorf("send %s: %v %s", s.name, err, out)
			}
		})
	}
	wg.Wait()
	t.Logf("sent %d streams at 200/s in %s", len(streams), time.Since(start).Round(time.Millisecond))
	for _, s := range streams {
		t.Run(s.name, func(t *testing.T) {
			need := int(math.Ceil(0.999 * float64(s.count)))
			for _, r := range byStream[s.name] {
				res := r.result(t)
				if res.Unique < need {
					t.Errorf("receiver on %s got %d of %d datagrams of %s (%+v), want at least %d", r.host.Name, res.Unique, s.count, s.group, res, need)
				} else {
					t.Logf("receiver on %s: %d of %d (duplicates %d)", r.host.Name, res.Unique, s.count, res.Duplicates)
				}
			}
		})
	}
	t.Run("isolation", func(t *testing.T) {
		for _, r := range []*mcReceiver{gw, other} {
			if res := r.result(t); res.Unique != 0 || res.Foreign != 0 {
				t.Errorf("%s (%s on %s, joined on %s) got traffic: %+v", r.stream, r.ctr, r.host.Name, r.iface, res)
			}
		}
	})

	t.Run("only-hosts-with-receivers", func(t *testing.T) {
		// A receiver on host 2 only: host 3 gets nothing of the group.
		g := "239.61.0.9:6109"
		group := netip.MustParseAddrPort(g).Addr()
		r := startMcReceiver(t, h2, "r-h2", "pruned", g, 500, "")
		waitJoined(t, r)
		waitFor(t, 15*time.Second, "host 1 replicates the group to host 2 only", func() bool {
			dsts := vxlanMDBDsts(t, c, h1, mcVNI, group)
			return len(dsts) == 1 && dsts[h2.UnderlayIP]
		})
		before := vxlanRx(t, c, h3, mcVNI)
		if out, err := h1.Docker("exec", "s1", harness.McastTool, "send", "-n", "500", "-rate", "500", g); err != nil {
			t.Fatalf("send: %v %s", err, out)
		}
		res := r.result(t)
		got3 := vxlanRx(t, c, h3, mcVNI) - before
		if res.Unique < 500 {
			t.Errorf("receiver on host 2 got %d of 500", res.Unique)
		}
		if got3 > 10 {
			t.Errorf("host 3 (no receiver) got %d VXLAN packets while 500 datagrams went to host 2", got3)
		}
		t.Logf("500 datagrams to a group joined on host 2 only: host 2 got %d, host 3's VXLAN device %d packets", res.Unique, got3)
		// The receiver is gone (it left the group): host 1 stops sending.
		waitFor(t, 15*time.Second, "host 1 stops replicating the group", func() bool {
			return len(vxlanMDBDsts(t, c, h1, mcVNI, group)) == 0
		})
	})

	t.Run("two-overlays", func(t *testing.T) {
		// A container joining a second overlay keeps its multicast route on
		// the first: libnetwork cannot add the same route twice.
		h2.MustDocker(t, "network", "connect", "mcred", "r-h2")
		routes := h2.MustDocker(t, "exec", "r-h2", "ip", "route", "show")
		if n := strings.Count(routes, "224.0.0.0/4"); n != 1 || !strings.Contains(routes, "224.0.0.0/4 dev eth0") {
			t.Errorf("routes after connecting a second overlay:\n%s", routes)
		}
		h2.MustDocker(t, "network", "disconnect", "mcred", "r-h2")
	})

	t.Run("cleanup", func(t *testing.T) {
		// A member's record goes with its container.
		r := startMcReceiver(t, h3, "r-h3", "last", "239.61.0.7:6107", 0, "")
		waitJoined(t, r)
		waitFor(t, 15*time.Second, "host 3 publishes its group", func() bool { return len(mcastKeys(t, st)) == 1 })
		t.Logf("store: %v", mcastKeys(t, st))
		for _, h := range c.Hosts {
			if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
				h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
		waitFor(t, 20*time.Second, "multicast memberships gone from the store", func() bool { return len(mcastKeys(t, st)) == 0 })
	})
}

// mcastKeys lists the multicast membership records in the store.
func mcastKeys(t *testing.T, st store.Store) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kvs, err := st.List(ctx, driver.McastDir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, kv := range kvs {
		out = append(out, kv.Key+"="+string(kv.Value))
	}
	return out
}

// mcReceiver is dnp-mcast recv running in a container.
type mcReceiver struct {
	host               *harness.Host
	ctr, stream, group string
	ready, iface       string
	done               chan struct{}
	out                string
	err                error
}

// startMcReceiver starts a receiver of group in container ctr that ends
// once it has count datagrams or 3 s after the last one; count 0 means:
// expect nothing, listen 15 s. iface "" lets the kernel choose.
func startMcReceiver(t *testing.T, h *harness.Host, ctr, stream, group string, count int, iface string) *mcReceiver {
	t.Helper()
	r := &mcReceiver{host: h, ctr: ctr, stream: stream, group: group, ready: "/tmp/ready-" + stream, done: make(chan struct{})}
	args := []string{"exec", ctr, harness.McastTool, "recv", "-n", strconv.Itoa(count), "-ready", r.ready}
	if count > 0 {
		args = append(args, "-timeout", "60s", "-idle", "3s")
	} else {
		args = append(args, "-timeout", "15s")
	}
	if iface != "" {
		args = append(args, "-i", iface)
	}
	go func() {
		defer close(r.done)
		r.out, r.err = h.Docker(append(args, group)...)
	}()
	return r
}

// waitJoined waits until the receivers joined their groups and records
// on which interface each did; one docker exec per container and round.
func waitJoined(t *testing.T, rs ...*mcReceiver) {
	t.Helper()
	type ctr struct {
		h    *harness.Host
		name string
	}
	pending := map[ctr][]*mcReceiver{}
	for _, r := range rs {
		k := ctr{r.host, r.ctr}
		pending[k] = append(pending[k], r)
	}
	waitFor(t, 30*time.Second, "receivers joined", func() bool {
		for k, rs := range pending {
			var files []string
			for _, r := range rs {
				select {
				case <-r.done:
					t.Fatalf("receiver %s in %s ended early: %v %s", r.stream, r.ctr, r.err, r.out)
				default:
				}
				files = append(files, r.ready)
			}
			// "<file> <interface>" for each ready file.
			args := append([]string{"exec", k.name, "sh", "-c", `for f in "$@"; do [ -f "$f" ] && echo "$f $(cat "$f")"; done; true`, "sh"}, files...)
			out, _ := k.h.Docker(args...)
			var left []*mcReceiver
			for _, r := range rs {
				if iface, ok := readyIface(out, r.ready); ok {
					r.iface = iface
				} else {
					left = append(left, r)
				}
			}
			if len(left) == 0 {
				delete(pending, k)
			} else {
				pending[k] = left
			}
		}
		return len(pending) == 0
	})
}

func readyIface(out, file string) (string, bool) {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == file {
			return f[1], true
		}
	}
	return "", false
}

// result waits for the receiver to end (a receiver expecting nothing is
// stopped) and returns what it counted.
func (r *mcReceiver) result(t *testing.T) mcast.Result {
	t.Helper()
	select {
	case <-r.done:
	case <-time.After(45 * time.Second):
		t.Fatalf("receiver %s in %s did not end", r.stream, r.ctr)
	}
	var res mcast.Result
	if err := json.Unmarshal([]byte(lastLine(r.out)), &res); err != nil {
		t.Fatalf("receiver %s in %s: %v %q (%v)", r.stream, r.ctr, r.err, r.out, err)
	}
	return res
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

func lineWith(s, word string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			return l
		}
	}
	return ""
}

// overlayNet opens the overlay with the given VNI on h as the plugin built it.
func overlayNet(t *testing.T, c *harness.Cluster, h *harness.Host, vni uint32) *overlay.Network {
	t.Helper()
	oh := &overlay.Host{NetNS: h.NetNS, Prefix: c.Prefix + "-" + h.Name + "-"}
	n, err := oh.Network(strconv.FormatUint(uint64(vni), 10))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// vxlanMDBDsts are the remote hosts h's VXLAN device replicates group to.
func vxlanMDBDsts(t *testing.T, c *harness.Cluster, h *harness.Host, vni uint32, group netip.Addr) map[string]bool {
	t.Helper()
	s, err := overlayNet(t, c, h, vni).State()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, e := range s.MDB {
		if e.Dev == "vxlan0" && e.Group == group && e.Dst.IsValid() {
			out[e.Dst.String()] = true
		}
	}
	return out
}

// vxlanRx is how many packets h's VXLAN device of the overlay received.
func vxlanRx(t *testing.T, c *harness.Cluster, h *harness.Host, vni uint32) uint64 {
	t.Helper()
	var n uint64
	err := harness.DoIn(overlayNet(t, c, h, vni).NetNS, func() error {
		l, err := netlink.LinkByName("vxlan0")
		if err != nil {
			return err
		}
		n = l.Attrs().Statistics.RxPackets
		return nil
	})
	if err != nil {
		t.Fatal(fmt.Errorf("%s: %w", h.Name, err))
	}
	return n
}
