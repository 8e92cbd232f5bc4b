package integration

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestIPAMWithDocker: the IPAM driver as real dockerd calls it, on two
// hosts sharing one etcd: --subnet, --ip-range, --gateway, --aux-address,
// docker run --ip, a taken address, IPv6, and a clean store afterwards.
func TestIPAMWithDocker(t *testing.T) {
	c := harness.New(t, 2, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url)
	}
	h1, h2 := c.Hosts[0], c.Hosts[1]
	for _, h := range c.Hosts {
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", "10.50.0.0/24", "--ip-range", "10.50.0.128/25", "--gateway", "10.50.0.1",
			"--aux-address", "router=10.50.0.200", "-o", "overlay=ipt", "ipt")
		if gw := h.MustDocker(t, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "ipt"); gw != "10.50.0.1" {
			t.Errorf("%s: gateway %q, want 10.50.0.1", h.Name, gw)
		}
	}

	// docker run --ip gets exactly that address; the same address on the
	// other host is refused with a clear error.
	if ip := runContainer(t, h1, "fixed", "ipt", "--ip", "10.50.0.150"); ip != "10.50.0.150" {
		t.Fatalf("--ip 10.50.0.150 gave %s", ip)
	}
	_, err := h2.Docker("run", "-d", "--init", "--name", "clash", "--network", "ipt", "--ip", "10.50.0.150", harness.Image, "sleep", "3600")
	if err == nil || !strings.Contains(err.Error(), "10.50.0.150") || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a taken --ip on another host: %v; want an error naming the address as in use", err)
	}
	t.Logf("taken address refused: %v", err)
	h2.Docker("rm", "-f", "clash")

	// Dynamic addresses come from the ip-range only, never the aux address,
	// the gateway or the fixed one, and differ across hosts.
	rng := netip.MustParsePrefix("10.50.0.128/25")
	seen := map[string]string{"10.50.0.150": "fixed"}
	for i, h := range []*harness.Host{h1, h2, h1, h2, h1, h2} {
		name := "dyn" + string(rune('a'+i))
		ip := runContainer(t, h, name, "ipt")
		a := netip.MustParseAddr(ip)
		if !rng.Contains(a) || ip == "10.50.0.200" || ip == "10.50.0.1" {
			t.Errorf("%s got %s: outside the ip-range or reserved", name, ip)
		}
		if other, dup := seen[ip]; dup {
			t.Errorf("%s and %s both got %s", name, other, ip)
		}
		seen[ip] = name
	}
	pingEventually(t, h2, "dynb", "10.50.0.150")
	t.Logf("addresses handed out: %v", seen)

	// IPv6: a dual-stack overlay; containers reach each other over IPv6
	// across hosts (neighbour entries for IPv6 too).
	v6 := map[string]string{}
	for _, h := range c.Hosts {
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--ipv6",
			"--subnet", "10.51.0.0/24", "--subnet", "fd00:51::/64", "-o", "overlay=dual", "dual")
		h.MustDocker(t, "run", "-d", "--init", "--name", "v6-"+h.Name, "--network", "dual", harness.Image, "sleep", "3600")
		v6[h.Name] = h.MustDocker(t, "inspect", "-f", "{{.NetworkSettings.Networks.dual.GlobalIPv6Address}}", "v6-"+h.Name)
		if a, err := netip.ParseAddr(v6[h.Name]); err != nil || !netip.MustParsePrefix("fd00:51::/64").Contains(a) {
			t.Fatalf("%s: IPv6 address %q not from fd00:51::/64", h.Name, v6[h.Name])
		}
	}
	waitFor(t, 20e9, "ping over IPv6 across hosts", func() bool {
		_, err := h1.Docker("exec", "v6-h1", "ping", "-6", "-c", "1", "-W", "2", v6["h2"])
		return err == nil
	})

	// Bad input is refused by name.
	_, err = h1.Docker("network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", "10.52.0.0/24",
		"--ipam-opt", "colour=blue", "bad")
	if err == nil || !strings.Contains(err.Error(), "colour") {
		t.Errorf("unknown IPAM option: %v; want an error naming it", err)
	}
	_, err = h1.Docker("network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", "10.50.0.0/16", "-o", "overlay=big", "overlapping")
	if err == nil || !strings.Contains(err.Error(), "10.50.0.0/24") {
		t.Errorf("a pool overlapping 10.50.0.0/24: %v; want an error naming the existing pool", err)
	}

	// Everything goes; the store keeps nothing of IPAM.
	for _, h := range c.Hosts {
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		for _, n := range []string{"ipt", "dual"} {
			if err := networkRm(h, n); err != nil {
				t.Error(err)
			}
		}
	}
	if left := storeKeys(t, st); len(left) > 0 {
		t.Errorf("store keys left: %v", left)
	}
}
