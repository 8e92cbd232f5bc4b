package overlay_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// testHost is one simulated host: a network namespace on a test underlay
// with an overlay.Host working in it.
type testHost struct {
	ul   *testenv.Underlay
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
			ul:   u,
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
			// The last encrypted network takes the crypt namespace with it;
			// if a failed test left it, it goes here (and its data path
			// stops by itself).
			crypt := h.host.Prefix + "crypt"
			if _, err := os.Stat(filepath.Join(overlay.DefaultDir, crypt)); err == nil {
				t.Errorf("cleanup: crypt namespace %s left; removing it", crypt)
				run("ip", "netns", "del", crypt)
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

// requireGRE reports whether a kernel without gretap fails the GRE tests
// instead of skipping them: DNP_REQUIRE_GRE=1, which package guest sets in
// its guest (Debian's kernel, which has gretap). On a machine whose own
// kernel lacks gretap these tests skip, and `go test ./guest` runs them.
func requireGRE() bool { return os.Getenv("DNP_REQUIRE_GRE") == "1" }

// encaps are the encapsulations the data-plane tests run with.
var encaps = []string{overlay.EncapVXLAN, overlay.EncapGRE}

// forEachEncap runs test as a subtest per encapsulation, each skipped
// (needEncap) where the kernel cannot carry it.
func forEachEncap(t *testing.T, test func(t *testing.T, encap string)) {
	for _, encap := range encaps {
		t.Run(encap, func(t *testing.T) {
			needEncap(t, encap)
			test(t, encap)
		})
	}
}

// needEncap skips t where the running kernel cannot carry encap (GRE).
// A kernel built without GRE is a property of the machine, not a missing
// package, so that skips with t.Skipf also in CI (testenv.Missing would
// fail there, and nothing CI could install would help). A kernel that has
// ip_gre as a module but no modprobe to load it lacks a package (kmod):
// that is testenv.Missing.
func needEncap(t *testing.T, encap string) {
	t.Helper()
	if encap != overlay.EncapGRE {
		return
	}
	modprobe := loadGREModule(t)
	err := overlay.Available(overlay.EncapGRE)
	if err == nil {
		return
	}
	if !errors.Is(err, overlay.ErrNoGRETap) {
		t.Fatalf("Available(gre): %v", err)
	}
	if requireGRE() {
		t.Fatalf("DNP_REQUIRE_GRE=1 but kernel %s has no gretap: %v (%s)", kernelRelease(), err, modprobe)
	}
	if mod := greModuleFile(); mod != "" {
		if modprobe == "" {
			testenv.Missing(t, "modprobe (package kmod) to load the kernel's GRE module %s: %v", mod, err)
		}
		t.Skipf("SKIP: kernel has no gretap: %v (module %s is there but did not load: %s)", err, mod, modprobe)
	}
	t.Skipf("SKIP: kernel has no gretap: %v (the running kernel %s has no ip_gre, neither built in nor as a module; "+
		"this is the kernel, not a missing package: nothing to install; `go test ./guest` runs these tests on Debian's kernel)",
		err, kernelRelease())
}

var (
	greModule       sync.Once
	greModuleResult string
)

// loadGREModule runs `modprobe ip_gre` once, if there is a modprobe, and
// returns what happened ("" if there is no modprobe). That is harmless:
// the kernel loads the same module by itself on the first gretap create
// where module autoloading works, and loading it only adds the kernel's
// inert fallback devices (gre0, gretap0, erspan0) to each namespace. It
// helps where autoloading is off.
func loadGREModule(t *testing.T) string {
	greModule.Do(func() {
		path, err := exec.LookPath("modprobe")
		if err != nil {
			t.Logf("no modprobe on PATH; relying on the kernel (built in, or autoloaded)")
			return
		}
		out, err := run(path, "ip_gre")
		greModuleResult = fmt.Sprintf("modprobe ip_gre: err=%v %s", err, strings.TrimSpace(out))
		t.Log(greModuleResult)
	})
	return greModuleResult
}

// greModuleFile is the running kernel's ip_gre module file, or "".
func greModuleFile() string {
	files, _ := filepath.Glob(filepath.Join("/lib/modules", kernelRelease(), "kernel/net/ipv4/ip_gre.ko*"))
	if len(files) == 0 {
		return ""
	}
	return files[0]
}

func kernelRelease() string {
	out, err := run("uname", "-r")
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(out)
}

// tunnels returns the network's GRE tunnel ports by remote host.
func tunnels(t *testing.T, n *overlay.Network) map[netip.Addr]overlay.TunnelState {
	t.Helper()
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	out := map[netip.Addr]overlay.TunnelState{}
	for _, ts := range st.Tunnels {
		out[ts.Remote] = ts
	}
	return out
}

// staticFDB lists the bridge's static FDB entries on the network's tunnel
// ports as strings ("MAC dst HOST master br0 static" for GRE).
func staticFDB(t *testing.T, n *overlay.Network) []string {
	t.Helper()
	st, err := n.State()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range st.FDB {
		if !e.Self && e.State == "static" {
			out = append(out, e.String())
		}
	}
	return out
}

// checkTunnel fails t unless ts is a tunnel as this package makes them:
// local -> remote with key vni, outer side in the host namespace, a
// bridge port with learning off and neigh_suppress and isolation on.
func checkTunnel(t *testing.T, h *testHost, netID string, ts overlay.TunnelState, local, remote netip.Addr, vni uint32) {
	t.Helper()
	if ts.Local != local || ts.Remote != remote || ts.IKey != vni || ts.OKey != vni || !ts.InHostNS {
		t.Fatalf("tunnel %+v; want local %s remote %s keys %d, outer side in the host namespace", ts, local, remote, vni)
	}
	if ts.Learning || !ts.Isolated || !ts.NeighSuppress {
		t.Fatalf("tunnel %s port flags: learning %v isolated %v neigh_suppress %v; want false true true", ts.Name, ts.Learning, ts.Isolated, ts.NeighSuppress)
	}
	// The same, as iproute2 shows it.
	port := mustRun(t, "bridge", "-n", h.ovName(netID), "-d", "link", "show", "dev", ts.Name)
	for _, want := range []string{"master br0", "learning off", "neigh_suppress on", "isolated on"} {
		if !strings.Contains(port, want) {
			t.Fatalf("bridge -d link show dev %s lacks %q:\n%s", ts.Name, want, port)
		}
	}
	dev := mustRun(t, "ip", "-d", "-n", h.ovName(netID), "link", "show", "dev", ts.Name)
	for _, want := range []string{"gretap remote " + remote.String() + " local " + local.String(), fmt.Sprintf("ikey %s okey %s", keyString(vni), keyString(vni))} {
		if !strings.Contains(dev, want) {
			t.Fatalf("ip -d link show %s lacks %q:\n%s", ts.Name, want, dev)
		}
	}
}

// keyString prints a GRE key as iproute2 does (dotted quad).
func keyString(k uint32) string {
	return netip.AddrFrom4([4]byte{byte(k >> 24), byte(k >> 16), byte(k >> 8), byte(k)}).String()
}

// fragCreates is the number of IPv4 fragments the host's namespace has
// made (Ip FragCreates in /proc/net/snmp).
func fragCreates(t *testing.T, h *testHost) int {
	t.Helper()
	out := h.ns.MustExec("cat", "/proc/net/snmp")
	var names []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Ip:" {
			continue
		}
		if names == nil {
			names = f
			continue
		}
		for i, name := range names {
			if name == "FragCreates" && i < len(f) {
				var n int
				if _, err := fmt.Sscan(f[i], &n); err != nil {
					t.Fatalf("parse FragCreates %q: %v", f[i], err)
				}
				return n
			}
		}
	}
	t.Fatalf("no Ip FragCreates in /proc/net/snmp:\n%s", out)
	return 0
}
