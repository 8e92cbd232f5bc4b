package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestOverlayGRE is encap=gre with real dockerd on two hosts, beside a
// VXLAN overlay on the same hosts: containers on different hosts reach each
// other over each overlay, the network really is GRE (a gretap tunnel to
// the other host, no VXLAN device), neither overlay reaches the other even
// at layer 2, and removing everything leaves nothing behind.
//
// Where the kernel has no gretap it skips with the reason: package guest
// runs it on Debian's own kernel, where DNP_REQUIRE_GRE=1 makes a missing
// gretap a failure.
func TestOverlayGRE(t *testing.T) {
	needGRE(t)
	// Generous for dockerd's start in the test guest, an emulated machine.
	c := harness.New(t, 2, harness.Options{ReadyTimeout: 3 * time.Minute})
	url, st := kvServer(t, c, "etcd")
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url)
	}
	h1, h2 := c.Hosts[0], c.Hosts[1]
	type overlayNet struct{ name, subnet, encap, mtu string }
	nets := []overlayNet{
		{"gre", "10.60.0.0/24", "gre", "1458"}, // 1500 - 42 (outer IPv4, GRE with key, inner Ethernet)
		{"vx", "10.61.0.0/24", "vxlan", "1450"},
	}
	// Containers are reached through their network namespaces (one docker
	// inspect each) rather than docker exec: cheaper, same data path.
	type box struct{ ip, netns string }
	boxes := map[string]box{} // "gre-h1" -> ...
	for _, n := range nets {
		for _, h := range c.Hosts {
			// --internal: only the overlay; egress is TestOverlayAcrossHosts'.
			h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--internal",
				"--subnet", n.subnet, "-o", "overlay="+n.name, "-o", "encap="+n.encap, n.name)
			name := n.name + "-" + h.Name
			h.MustDocker(t, "run", "-d", "--init", "--name", name, "--network", n.name, harness.Image, "sleep", "3600")
			out := h.MustDocker(t, "inspect", "-f", "{{.State.Pid}} {{(index .NetworkSettings.Networks \""+n.name+"\").IPAddress}}", name)
			f := strings.Fields(out)
			if len(f) != 2 {
				t.Fatalf("inspect %s: %q", name, out)
			}
			boxes[name] = box{ip: f[1], netns: "/proc/" + f[0] + "/ns/net"}
			link, err := harness.ExecIn(boxes[name].netns, "ip", "-o", "link", "show", "dev", "eth0")
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(link, " mtu "+n.mtu+" ") {
				t.Errorf("%s: container MTU on %s overlay: %s; want %s", name, n.encap, link, n.mtu)
			}
		}
	}

	// The gre network's namespace on each host has a gretap tunnel to the
	// other host and no VXLAN device; the vx network's has vxlan0 only.
	for _, h := range c.Hosts {
		other := h2
		if h == h2 {
			other = h1
		}
		var gretaps, vxlans int
		for _, ns := range overlayNamespaces(t, c, h) {
			g, err := harness.ExecIn("/run/netns/"+ns, "ip", "-d", "-o", "link", "show", "type", "gretap")
			if err != nil {
				t.Fatal(err)
			}
			v, err := harness.ExecIn("/run/netns/"+ns, "ip", "-d", "-o", "link", "show", "type", "vxlan")
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(g, "remote "+other.UnderlayIP+" local "+h.UnderlayIP) {
				gretaps++
				if v != "" {
					t.Errorf("%s: the GRE network's namespace %s also has a VXLAN device: %s", h.Name, ns, v)
				}
			}
			if v != "" {
				vxlans++
			}
		}
		if gretaps != 1 || vxlans != 1 {
			t.Errorf("%s: %d namespaces with a gretap tunnel to %s and %d with a VXLAN device; want 1 and 1",
				h.Name, gretaps, other.UnderlayIP, vxlans)
		}
	}

	ping := func(from, to string) error {
		_, err := harness.ExecIn(boxes[from].netns, "busybox", "ping", "-c", "1", "-W", "1", boxes[to].ip)
		return err
	}
	pingEventually := func(from, to string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			err := ping(from, to)
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s cannot ping %s (%s): %v", from, to, boxes[to].ip, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	for _, n := range nets {
		pingEventually(n.name+"-h1", n.name+"-h2")
		pingEventually(n.name+"-h2", n.name+"-h1")
	}
	t.Logf("gre and vxlan overlays: containers on h1 and h2 ping each other")

	// doctor checks the GRE overlay too: its tunnel port to the other host.
	bin := harness.PluginBinary(t)
	for _, h := range c.Hosts {
		out, code := cli(t, h.Command(bin, "doctor", "--store", url, "--advertise-addr", h.UnderlayIP,
			"--netns-prefix", c.Prefix+"-"+h.Name+"-"))
		if code != 0 || !strings.Contains(out, "namespace, br0, 1 GRE tunnel port(s) and 1 endpoint port(s) as expected (MTU 1458)") {
			t.Errorf("doctor on %s exited %d; want no problems and the GRE overlay's tunnel port checked:\n%s", h.Name, code, out)
		}
	}

	// Isolation at layer 2: a route that puts the other overlay's subnet on
	// eth0 makes the container ARP for those addresses on its own overlay;
	// nothing there may answer.
	for _, pair := range [][2]string{{"gre", "vx"}, {"vx", "gre"}} {
		from := pair[0] + "-h1"
		subnet := nets[1].subnet
		if pair[1] == "gre" {
			subnet = nets[0].subnet
		}
		if _, err := harness.ExecIn(boxes[from].netns, "ip", "route", "add", subnet, "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
		for _, to := range []string{pair[1] + "-h1", pair[1] + "-h2"} {
			if err := ping(from, to); err == nil {
				t.Errorf("%s reached %s (%s) across overlays", from, to, boxes[to].ip)
			}
		}
	}

	// Everything goes; nothing stays: no overlay namespace, no tunnel in
	// the host namespaces (the kernel's own fallback device gretap0 aside),
	// no plugin interface or iptables rule, no store key.
	for _, h := range c.Hosts {
		h.MustDocker(t, "rm", "-f", "gre-"+h.Name, "vx-"+h.Name)
		for _, n := range nets {
			if err := networkRm(h, n.name); err != nil {
				t.Error(err)
			}
		}
	}
	for _, h := range c.Hosts {
		waitFor(t, 15*time.Second, h.Name+": overlay namespaces removed", func() bool {
			return len(overlayNamespaces(t, c, h)) == 0
		})
		links, err := h.Exec("ip", "-o", "link", "show", "type", "gretap")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(links, "\n") {
			if f := strings.Fields(line); len(f) > 1 && !strings.HasPrefix(f[1], "gretap0@") {
				t.Errorf("%s: GRE tunnel left in the host namespace: %s", h.Name, line)
			}
		}
		assertNoPluginLeftovers(t, h, "10.60.0", "10.61.0")
	}
	waitFor(t, 10*time.Second, "store emptied", func() bool { return len(storeKeys(t, st)) == 0 })
}

// needGRE skips t where the kernel cannot make gretap devices, or fails it
// when DNP_REQUIRE_GRE=1 (set in the guest of package guest, which exists
// to run these tests on a kernel that has it). The probe runs in a child
// process in a namespace of its own: probing in this process would leave
// one of its threads in a throwaway namespace, which harness.AttachRoot
// (it names this process's namespace by PID) could then pick.
func needGRE(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "unshare", "--net", "--", "ip", "link", "add", "probe0", "type", "gretap",
		"local", "127.0.0.1", "remote", "127.0.0.2", "key", "1").CombinedOutput()
	if err == nil {
		return
	}
	why := fmt.Sprintf("`ip link add type gretap` in a new namespace: %v: %s", err, strings.TrimSpace(string(out)))
	if os.Getenv("DNP_REQUIRE_GRE") == "1" {
		t.Fatalf("DNP_REQUIRE_GRE=1 but this kernel has no gretap: %s", why)
	}
	t.Skipf("SKIP: this kernel has no gretap (%s); `go test ./guest` runs this test on Debian's kernel", why)
}
