package integration

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// lifecyclePings is how many pings, 100 ms apart, run through the plugins'
// lifecycle: long enough to cover h2's disable, set, upgrade and enable
// and h3's rm -f and install (about 3 s each seen) with room to spare.
const lifecyclePings = 250

// TestPluginRegistry: the plugin as users get it, from a registry, and its
// lifecycle without breaking containers. A real registry (Debian's
// docker-registry, TLS with a certificate of a throwaway CA that every
// host trusts) runs on the underlay. Host h1 builds the plugin with the
// Dockerfile and pushes it (scripts/push-plugin.sh, as users do) as tag 1
// and, from a binary of another version, tag 2. Every host installs tag 1
// with docker plugin install; containers on the three hosts reach each
// other. Then, while containers ping across h2 and h3 every 100 ms, h2's
// plugin is disabled, reconfigured (docker plugin set), upgraded to tag 2
// from the registry and enabled, and h3's is removed (rm -f) and tag 2
// installed instead: not one ping is lost, tag 2 runs with the settings
// kept, the overlay namespaces are the very same, and new containers on
// h2 and h3 reach the others.
func TestPluginRegistry(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	url, _ := kvServer(t, c, "etcd") // attaches the test's namespace to the underlay
	reg := testenv.StartRegistry(t, testenv.ServerOptions{IP: c.RootIP})
	for _, h := range c.Hosts {
		if err := h.TrustRegistry(reg.Addr, reg.CA); err != nil {
			t.Fatal(err)
		}
	}
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]

	// Build and push tags 1 and 2 from h1.
	v1Dir, v2Dir := managedPluginDir(t), upgradePluginDir(t)
	v2 := pluginVersion(t, v2Dir)
	ref1, ref2 := reg.Addr+"/dnp:1", reg.Addr+"/dnp:2"
	start := time.Now()
	pushPlugin(t, c, h1, v1Dir, ref1)
	pushPlugin(t, c, h1, v2Dir, ref2)
	t.Logf("h1 built %s and %s with the Dockerfile and pushed them in %s", ref1, ref2, time.Since(start).Round(time.Millisecond))
	// h1 keeps no local copy: every host installs from the registry.
	h1.MustDocker(t, "plugin", "rm", ref1, ref2)

	plugins := map[string]*harness.ManagedPlugin{}
	install := func(h *harness.Host, ref string) {
		t.Helper()
		start := time.Now()
		args := append([]string{"plugin", "install", "--grant-all-permissions", "--alias", managedName, ref},
			managedSettings(t, c, h)...)
		h.MustDocker(t, append(args, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP)...)
		p, err := harness.ManagedPluginOf(h, managedName)
		if err != nil {
			t.Fatal(err)
		}
		plugins[h.Name] = p
		c.Cleanup(func() {
			if t.Failed() {
				t.Logf("managed plugin log of %s:\n%s", h.Name, p.Log(80))
			}
		})
		t.Logf("%s: docker plugin install %s as %s: enabled in %s", h.Name, ref, managedName, time.Since(start).Round(time.Millisecond))
	}
	for _, h := range c.Hosts {
		install(h, ref1)
	}

	ips := map[string]string{}
	for _, h := range c.Hosts {
		netCreateManaged(t, h, "blue", "10.20.0.0/24")
		ips[h.Name] = runContainer(t, h, "blue-"+h.Name, "blue")
	}
	for _, from := range c.Hosts {
		for _, to := range c.Hosts {
			if from != to {
				pingEventually(t, from, "blue-"+from.Name, ips[to.Name])
			}
		}
	}
	t.Logf("blue: every pair of hosts pings both ways with the plugin from the registry: %v", ips)
	before := overlayNS(t, plugins["h2"])
	if len(before) != 1 {
		t.Fatalf("h2: overlay namespaces in the state mount: %v; want one", before)
	}

	// h2's plugin is disabled, reconfigured, upgraded and enabled; then
	// h3's is removed (rm -f) and tag 2 installed in its place; with pings
	// every 100 ms across both.
	runs := []*pingRun{
		startPingRun(h2, "blue-h2", ips["h3"], lifecyclePings),
		startPingRun(h3, "blue-h3", ips["h2"], lifecyclePings),
		startPingRun(h1, "blue-h1", ips["h2"], lifecyclePings),
	}
	time.Sleep(time.Second)
	step := func(h *harness.Host, what string, args ...string) string {
		t.Helper()
		start := time.Now()
		out := h.MustDocker(t, args...)
		t.Logf("%s: %s: %s", h.Name, what, time.Since(start).Round(time.Millisecond))
		return out
	}
	down := time.Now()
	step(h2, "docker plugin disable -f", "plugin", "disable", "-f", managedName)
	step(h2, "docker plugin set DNP_LOG_LEVEL=info", "plugin", "set", managedName, "DNP_LOG_LEVEL=info")
	// Without --skip-remote-check the CLI asks whether to upgrade to
	// another tag than the one installed; with no terminal to answer, it
	// cancels (26.1 and 28.5 then exit 0, 20.10 exits 1).
	if out := step(h2, "docker plugin upgrade "+ref2, "plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check", managedName, ref2); !strings.Contains(out, "Upgraded plugin") {
		t.Fatalf("h2: docker plugin upgrade %s %s did not upgrade:\n%s", managedName, ref2, out)
	}
	// An upgrade replaces config.json, and with it the mount sources set
	// before (the environment settings stay): set them again.
	t.Logf("h2: mounts after the upgrade: %s", h2.MustDocker(t, "plugin", "inspect", "-f",
		"{{range .Config.Mounts}}{{.Name}}.source={{.Source}} {{end}}", managedName))
	var mounts []string
	for _, s := range managedSettings(t, c, h2) {
		if strings.Contains(s, ".source=") {
			mounts = append(mounts, s)
		}
	}
	step(h2, "docker plugin set (mount sources)", append([]string{"plugin", "set", managedName}, mounts...)...)
	step(h2, "docker plugin enable", "plugin", "enable", managedName)
	if err := plugins["h2"].WaitReady(); err != nil {
		t.Fatal(err)
	}
	t.Logf("h2: plugin down for %s (disable, set, upgrade, set, enable)", time.Since(down).Round(time.Millisecond))

	before3 := overlayNS(t, plugins["h3"])
	down = time.Now()
	step(h3, "docker plugin rm -f", "plugin", "rm", "-f", managedName)
	install(h3, ref2)
	t.Logf("h3: plugin away for %s (rm -f, install)", time.Since(down).Round(time.Millisecond))
	for _, r := range runs {
		select {
		case <-r.done:
			t.Fatalf("%s ended before the plugins were back: raise lifecyclePings", r.what)
		default:
		}
	}

	// Meanwhile the pings run on: new containers on h2 reach the others.
	ips["h2b"] = runContainer(t, h2, "blue-h2b", "blue")
	pingEventually(t, h2, "blue-h2b", ips["h1"])
	pingEventually(t, h2, "blue-h2b", ips["h3"])
	pingEventually(t, h3, "blue-h3", ips["h2b"])
	t.Logf("after the lifecycle: new h2 container %s reaches h1 and h3, and back", ips["h2b"])
	ips["h3b"] = runContainer(t, h3, "blue-h3b", "blue")
	pingEventually(t, h3, "blue-h3b", ips["h2b"])
	pingEventually(t, h1, "blue-h1", ips["h3b"])

	for _, r := range runs {
		sent, received := r.wait(t)
		t.Logf("%s: %d sent, %d received across the plugins' lifecycle", r.what, sent, received)
		if sent != lifecyclePings || received != sent {
			t.Errorf("%s: lost %d of %d pings across the plugins' lifecycle:\n%s", r.what, sent-received, sent, r.out)
		}
	}
	if ok, out := ping(h2, "blue-h2", ips["h1"]); !ok {
		t.Errorf("after the lifecycle h2's first container cannot reach h1: %s", out)
	}
	if after := overlayNS(t, plugins["h2"]); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("h2: overlay namespaces %v after the lifecycle; want the very same as before %v", after, before)
	}
	if after := overlayNS(t, plugins["h3"]); fmt.Sprint(after) != fmt.Sprint(before3) {
		t.Errorf("h3: overlay namespaces %v after rm -f and install; want the very same as before %v", after, before3)
	}
	env := h2.MustDocker(t, "plugin", "inspect", "-f", "{{json .Settings.Env}}", managedName)
	for _, want := range []string{"DNP_STORE=" + url, "DNP_LOG_LEVEL=info"} {
		if !strings.Contains(env, `"`+want+`"`) {
			t.Errorf("h2: plugin settings %s after the lifecycle; want %s", env, want)
		}
	}
	for _, h := range []*harness.Host{h2, h3} {
		if got := h.MustDocker(t, "plugin", "inspect", "-f", "{{.PluginReference}}", managedName); got != ref2 {
			t.Errorf("%s: plugin reference %q; want %q", h.Name, got, ref2)
		}
		if log := plugins[h.Name].Log(200); !strings.Contains(log, "version="+v2) {
			t.Errorf("%s: no plugin of version %s started; log:\n%s", h.Name, v2, log)
		}
	}
}

var (
	upgradeDirOnce sync.Once
	upgradeDir     string
	upgradeDirErr  error
)

// upgradePluginDir builds a second managed-plugin directory, once per test
// binary, whose binary reports another version: a second tag needs a
// rootfs that differs from the first.
func upgradePluginDir(t testing.TB) string {
	t.Helper()
	upgradeDirOnce.Do(func() {
		dir, err := os.MkdirTemp("", "dnp-plugin-")
		if err != nil {
			upgradeDirErr = err
			return
		}
		upgradeDir = filepath.Join(dir, "plugin")
		cmd := exec.Command("bash", "../scripts/build-plugin.sh")
		cmd.Env = append(os.Environ(), "PLUGIN_DIR="+upgradeDir, "PLUGIN_VERSION="+pluginVersion(t, managedPluginDir(t))+"-next")
		if out, err := cmd.CombinedOutput(); err != nil {
			upgradeDirErr = fmt.Errorf("scripts/build-plugin.sh: %v\n%s", err, out)
		}
	})
	if upgradeDirErr != nil {
		t.Fatal(upgradeDirErr)
	}
	return upgradeDir
}

// pluginVersion is the version the plugin binary in dir reports.
func pluginVersion(t testing.TB, dir string) string {
	t.Helper()
	out, err := exec.Command(filepath.Join(dir, "rootfs", "docker-net-plugin"), "version").Output()
	if err != nil {
		t.Fatalf("plugin version: %v", err)
	}
	return strings.TrimSpace(string(out))
}

// pushPlugin publishes the plugin directory dir as ref from h with
// scripts/push-plugin.sh, the way users publish it.
func pushPlugin(t *testing.T, c *harness.Cluster, h *harness.Host, dir, ref string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "../scripts/push-plugin.sh", ref)
	cmd.Env = append(h.DockerEnv(), "PLUGIN_DIR="+dir, "DOCKER="+c.Engine.Docker)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s: scripts/push-plugin.sh %s: %v\n%s", h.Name, ref, err, out)
	}
	t.Logf("%s: scripts/push-plugin.sh %s:\n%s", h.Name, ref, strings.TrimSpace(string(out)))
}
