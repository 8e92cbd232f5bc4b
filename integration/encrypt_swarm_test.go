package integration

import (
	"compress/gzip"
	"io"
	"os"

	"bytes"
	"golang.org/x/sys/unix"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// TestEncryptedSwarm: a swarm network of the managed plugin with
// -o encrypted, a global service on three nodes, side by side with
// Docker's own overlay driver on the same hosts (sharing UDP port 4789
// with the plugin's source filter), plain and --opt encrypted. The
// plugin's tasks reach each other without their traffic crossing the
// underlay in clear; Docker's plain overlay keeps working. Docker's
// encrypted overlay needs ESP in the kernel: where it cannot carry
// traffic, the test says so and why.
func TestEncryptedSwarm(t *testing.T) {
	const (
		secNet, secSubnet   = "secswarm", "10.82.0.0/24"
		dockNet, dockSubnet = "dockplain", "10.83.0.0/24"
		encNet, encSubnet   = "dockenc", "10.84.0.0/24"
		service             = "secpinger"
	)
	c := harness.New(t, 3, harness.Options{})
	url, _ := kvServer(t, c, "etcd")
	mgr, workers := c.Hosts[0], c.Hosts[1:]
	plugins := map[string]*harness.ManagedPlugin{}
	for _, h := range c.Hosts {
		plugins[h.Name] = installManaged(t, c, h, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP, "DNP_SCOPE=global",
			"DNP_REKEY_INTERVAL="+encRekey.String())
	}
	if err := c.FormSwarm(mgr, workers...); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 60*time.Second, "every swarm node lists the plugin", func() bool {
		listed, err := mgr.NodePlugins()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, h := range c.Hosts {
			if slices.Contains(listed[h.Hostname], "Network="+managedName) {
				n++
			}
		}
		return n == len(c.Hosts)
	})

	mgr.MustDocker(t, "network", "create", "-d", managedName, "--ipam-driver", managedName, "--attachable",
		"--subnet", secSubnet, "-o", "encrypted", secNet)
	if opts := mgr.MustDocker(t, "network", "inspect", "-f", "{{json .Options}}", secNet); !strings.Contains(opts, `"encrypted":""`) {
		t.Errorf("%s options %s: want encrypted", secNet, opts)
	}
	mgr.MustDocker(t, "service", "create", "--detach", "--name", service, "--mode", "global", "--init",
		"--no-resolve-image", "--network", secNet, harness.Image, "sleep", "3600")
	mgr.MustDocker(t, "network", "create", "-d", "overlay", "--attachable", "--subnet", dockSubnet, dockNet)
	_, encErr := mgr.Docker("network", "create", "-d", "overlay", "--attachable", "--opt", "encrypted", "--subnet", encSubnet, encNet)

	subnet := netip.MustParsePrefix(secSubnet)
	tasks, ips := map[string]string{}, map[string]string{}
	for _, h := range c.Hosts {
		waitFor(t, 90*time.Second, h.Name+": the service's task runs with an address on "+secNet, func() bool {
			id, _ := h.Docker("ps", "-q", "--filter", "label=com.docker.swarm.service.name="+service)
			if id == "" || strings.Contains(id, "\n") {
				return false
			}
			ip, _ := h.Docker("inspect", "-f", `{{(index .NetworkSettings.Networks "`+secNet+`").IPAddress}}`, id)
			if a, err := netip.ParseAddr(ip); err != nil || !subnet.Contains(a) {
				return false
			}
			tasks[h.Name], ips[h.Name] = id, ip
			return true
		})
		if mtu := h.MustDocker(t, "exec", tasks[h.Name], "cat", "/sys/class/net/eth0/mtu"); mtu != "1410" {
			t.Errorf("%s: task MTU %s, want 1410", h.Name, mtu)
		}
	}
	for _, from := range c.Hosts {
		for _, to := range c.Hosts {
			if from != to {
				pingEventually(t, from, tasks[from.Name], ips[to.Name])
			}
		}
	}
	t.Logf("%s (encrypted, swarm): every task pings every other across hosts: %v", secNet, ips)

	// Docker's plain overlay on two of the hosts, next to the plugin's.
	h1, h2 := c.Hosts[0], c.Hosts[1]
	runContainer(t, h1, "dock-h1", dockNet)
	dock2 := runContainer(t, h2, "dock-h2", dockNet)
	pingEventually(t, h1, "dock-h1", dock2)

	// On the underlay: the plugin's pings never in clear; Docker's plain
	// overlay's are (the capture's proof that it sees the traffic).
	capture := testenv.StartCapture(t, c.SwitchNetNS)
	for _, p := range []struct {
		h       *harness.Host
		ctr, ip string
		pattern string
	}{
		{h1, tasks["h1"], ips["h2"], encPattern}, {h2, tasks["h2"], ips["h3"], encPattern}, {h1, "dock-h1", dock2, plainPattern},
	} {
		out, err := p.h.Docker("exec", p.ctr, "ping", "-q", "-c", "10", "-i", "0.1", "-W", "2", "-s", "1382", "-p", p.pattern, p.ip)
		if err != nil || !strings.Contains(out, "10 packets received") {
			t.Errorf("%s: pings %s -> %s: %v\n%s", p.h.Name, p.ctr, p.ip, err, out)
		}
	}
	capture.Stop()
	checkUnderlay(t, capture, true)
	t.Logf("Docker's plain overlay %s works next to the plugin's: dock-h1 -> %s", dockNet, dock2)

	// A crash of h2's managed plugin (kill -9; dockerd restarts it): its
	// encryption data path runs in a container of its own and carries on.
	// No ping is lost, and nothing crosses the underlay in clear.
	const count = 40 // 8 s
	capture = testenv.StartCapture(t, c.SwitchNetNS)
	fromH1 := pingSeriesPattern(h1, tasks["h1"], ips["h2"], count, encPattern)
	time.Sleep(time.Second)
	oldPID, err := plugins["h2"].Kill()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	newPID, err := plugins["h2"].WaitRestarted(oldPID)
	if err != nil {
		t.Fatal(err)
	}
	restartedIn := time.Since(killed)
	got := <-fromH1
	capture.Stop()
	if n := capture.Count(bytes.Repeat([]byte{0xa5}, 32)); n > 0 {
		t.Errorf("while h2's plugin restarted, %d frames carried the ping pattern in clear", n)
	}
	t.Logf("h2's managed plugin killed (pid %d), restarted by dockerd as pid %d in %s: h1 -> h2 %d of %d pings answered, none in clear",
		oldPID, newPID, restartedIn.Round(time.Millisecond), got, count)
	if got != count {
		t.Errorf("h1 -> h2: %d of %d pings lost across h2's managed plugin restart (%s); want none", count-got, count, restartedIn.Round(time.Millisecond))
	}

	// Docker's encrypted overlay: it needs ESP (IPsec) in the kernel.
	switch {
	case encErr != nil:
		t.Logf("Docker's encrypted overlay: network create failed: %v", encErr)
	default:
		runContainer(t, h1, "enc-h1", encNet)
		enc2 := runContainer(t, h2, "enc-h2", encNet)
		capture = testenv.StartCapture(t, c.SwitchNetNS)
		ok := false
		for deadline := time.Now().Add(8 * time.Second); time.Now().Before(deadline) && !ok; {
			ok, _ = ping(h1, "enc-h1", enc2)
		}
		capture.Stop()
		if ok {
			if n := capture.Count(bytes.Repeat([]byte{0xa5}, 32)); n > 0 {
				t.Errorf("Docker's encrypted overlay carried a ping pattern in clear")
			}
			t.Logf("Docker's encrypted overlay %s carries traffic on this kernel", encNet)
		} else {
			t.Logf("Docker's encrypted overlay %s carries no traffic on this kernel (enc-h1 cannot ping %s); kernel: %s", encNet, enc2, kernelESP())
		}
	}
	// The plugin's encrypted overlay keeps working whatever Docker's did.
	pingEventually(t, h1, tasks["h1"], ips["h3"])
	pingEventually(t, h1, "dock-h1", dock2)
}

// kernelESP says whether this kernel can do ESP (Docker's encrypted
// overlay, IPsec), from its configuration.
func kernelESP() string {
	cfg, err := readKernelConfig()
	if err != nil {
		return "configuration unreadable: " + err.Error()
	}
	var found []string
	for _, opt := range []string{"CONFIG_INET_ESP", "CONFIG_CRYPTO_GCM", "CONFIG_NETFILTER_XT_MATCH_U32"} {
		v := "not set"
		for _, line := range strings.Split(cfg, "\n") {
			if strings.HasPrefix(line, opt+"=") {
				v = strings.TrimPrefix(line, opt+"=")
			}
		}
		found = append(found, opt+" "+v)
	}
	return strings.Join(found, ", ")
}

func readKernelConfig() (string, error) {
	if f, err := os.Open("/proc/config.gz"); err == nil {
		defer f.Close()
		z, err := gzip.NewReader(f)
		if err != nil {
			return "", err
		}
		b, err := io.ReadAll(z)
		return string(b), err
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	b, err := os.ReadFile("/boot/config-" + unix.ByteSliceToString(u.Release[:]))
	return string(b), err
}

// pingSeriesPattern is pingSeries with a payload pattern: count pings 0.2 s
// apart; it delivers how many were answered.
func pingSeriesPattern(h *harness.Host, container, ip string, count int, pattern string) <-chan int {
	done := make(chan int, 1)
	go func() {
		out, _ := h.Docker("exec", container, "ping", "-q", "-i", "0.2", "-W", "1", "-p", pattern, "-c", strconv.Itoa(count), ip)
		received := -1
		if m := pingStats.FindStringSubmatch(out); m != nil {
			received, _ = strconv.Atoi(m[2])
		}
		done <- received
	}()
	return done
}
