package integration

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// cryptLabel marks the containers the managed plugin runs its encryption
// data path in (overlay/crypt/dockerrun); cryptImage is their image's
// repository.
const (
	cryptLabel = "org.dnplabs.docker-net-plugin.crypt"
	cryptImage = "docker-net-plugin-crypt"
)

// TestManagedEncrypted: the managed plugin on two hosts with an encrypted
// overlay. Its encryption data path runs in a container of its own, so it
// outlives the plugin: with full-size pings every 100 ms both ways, a
// kill -9 of one host's plugin loses none (the data path container is the
// very same after), nor does docker plugin disable -f, set and enable
// (the new setting makes the plugin replace its data path container, the
// new one taking over from the old one), and nothing crosses the underlay
// in clear meanwhile. The last encrypted overlay takes the container and
// its image with it, also when the plugin is disabled and removed right
// after.
func TestManagedEncrypted(t *testing.T) {
	const subnet = "10.86.0.0/24"
	c := harness.New(t, 2, harness.Options{})
	url, _ := kvServer(t, c, "etcd")
	h1, h2 := c.Hosts[0], c.Hosts[1]
	plugins := map[*harness.Host]*harness.ManagedPlugin{}
	for _, h := range c.Hosts {
		plugins[h] = installManaged(t, c, h, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP,
			"DNP_REKEY_INTERVAL="+encRekey.String())
	}
	ips := map[*harness.Host]string{}
	for _, h := range c.Hosts {
		h.MustDocker(t, "network", "create", "-d", managedName, "--ipam-driver", managedName,
			"--subnet", subnet, "-o", "overlay=msec", "-o", "encrypted", "msec")
		ips[h] = runContainer(t, h, "ms-"+h.Name, "msec")
	}
	pingEventually(t, h1, "ms-h1", ips[h2])
	pingEventually(t, h2, "ms-h2", ips[h1])
	before := map[*harness.Host]string{}
	for _, h := range c.Hosts {
		waitFor(t, 30*time.Second, h.Name+": the data path runs in a container of its own", func() bool {
			ids := cryptContainers(t, h)
			if len(ids) == 1 {
				before[h] = ids[0]
			}
			return len(ids) == 1
		})
	}
	t.Logf("msec (encrypted): h1 %s <-> h2 %s; data path containers: h1 %s, h2 %s", ips[h1], ips[h2], before[h1], before[h2])

	full := strconv.Itoa(1410 - 28)
	capture := testenv.StartCapture(t, c.SwitchNetNS)
	pingBoth := func(count int) []*pingRun {
		return []*pingRun{
			startPingRunArgs(h1, "ms-h1", ips[h2], count, "-s", full, "-p", encPattern),
			startPingRunArgs(h2, "ms-h2", ips[h1], count, "-s", full, "-p", encPattern),
		}
	}
	checkPings := func(runs []*pingRun, count int, across string) {
		t.Helper()
		for _, r := range runs {
			sent, received := r.wait(t)
			t.Logf("%s: %d sent, %d received across %s", r.what, sent, received, across)
			if sent != count || received != sent {
				t.Errorf("%s: lost %d of %d pings across %s:\n%s", r.what, sent-received, sent, across, r.out)
			}
		}
	}

	// A crash of h1's plugin: dockerd restarts it; the data path runs on.
	const crash = 50 // 5 s
	runs := pingBoth(crash)
	time.Sleep(time.Second)
	oldPID, err := plugins[h1].Kill()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	newPID, err := plugins[h1].WaitRestarted(oldPID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("h1: plugin pid %d killed, dockerd restarted it as pid %d in %s", oldPID, newPID, time.Since(killed).Round(time.Millisecond))
	checkPings(runs, crash, "h1's plugin kill -9")
	if ids := cryptContainers(t, h1); len(ids) != 1 || ids[0] != before[h1] {
		t.Errorf("h1: data path containers %v after the plugin's restart; want the very same %s", ids, before[h1])
	}

	// h1's plugin disabled, reconfigured (another log level: also the
	// data path's) and enabled again.
	const lifecycle = 120 // 12 s
	runs = pingBoth(lifecycle)
	time.Sleep(time.Second)
	down := reconfigure(t, h1, plugins[h1])
	var replaced string
	waitFor(t, 30*time.Second, "h1: the data path container replaced (its log level changed)", func() bool {
		ids := cryptContainers(t, h1)
		if len(ids) == 1 && ids[0] != before[h1] {
			replaced = ids[0]
		}
		return replaced != ""
	})
	t.Logf("h1: data path container %s replaced by %s after %s", before[h1], replaced, time.Since(down).Round(time.Millisecond))
	for _, r := range runs {
		select {
		case <-r.done:
			t.Fatalf("%s ended before h1's data path was replaced: raise the ping count", r.what)
		default:
		}
	}
	checkPings(runs, lifecycle, "h1's plugin disable, set, enable and the replacement of its data path")
	capture.Stop()
	checkUnderlay(t, capture, false)
	if ids := cryptContainers(t, h2); len(ids) != 1 || ids[0] != before[h2] {
		t.Errorf("h2: data path containers %v; want the very same %s all along", ids, before[h2])
	}

	// The last encrypted overlay goes, and the data path's container and
	// image with it: on h2 while its plugin runs on, on h1 with the plugin
	// disabled and removed right after (it tidies up on its way down).
	h1.MustDocker(t, "rm", "-f", "ms-h1")
	h1.MustDocker(t, "network", "rm", "msec")
	h1.MustDocker(t, "plugin", "disable", managedName)
	h1.MustDocker(t, "plugin", "rm", managedName)
	if left := h1.MustDocker(t, "ps", "-aq"); left != "" {
		t.Errorf("h1: containers left after the last network and the plugin's removal: %s", left)
	}
	if left := h1.MustDocker(t, "images", "-q", cryptImage); left != "" {
		t.Errorf("h1: data path images left after the last network and the plugin's removal: %s", left)
	}
	h2.MustDocker(t, "rm", "-f", "ms-h2")
	h2.MustDocker(t, "network", "rm", "msec")
	waitFor(t, 15*time.Second, "h2: the data path's container and image removed", func() bool {
		return len(cryptContainers(t, h2)) == 0 && h2.MustDocker(t, "images", "-q", cryptImage) == ""
	})
	for _, h := range c.Hosts {
		if ns := overlayNS(t, plugins[h]); len(ns) != 0 {
			t.Errorf("%s: namespaces left in the state mount: %v", h.Name, ns)
		}
	}
}

// cryptContainers lists the IDs of h's data path containers, running or not.
func cryptContainers(t *testing.T, h *harness.Host) []string {
	t.Helper()
	return strings.Fields(h.MustDocker(t, "ps", "-aq", "--no-trunc", "--filter", "label="+cryptLabel))
}

// startPingRunArgs is startPingRun (pings every 100 ms) with more ping
// arguments (size, pattern).
func startPingRunArgs(h *harness.Host, container, ip string, count int, args ...string) *pingRun {
	r := &pingRun{what: fmt.Sprintf("%s on %s -> %s", container, h.Name, ip), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		cmd := append([]string{"exec", container, "ping", "-q", "-i", "0.1", "-c", strconv.Itoa(count), "-W", "5"}, args...)
		out, err := h.Docker(append(cmd, ip)...)
		r.out = out
		if err != nil {
			r.out += "\n" + err.Error()
		}
	}()
	return r
}
