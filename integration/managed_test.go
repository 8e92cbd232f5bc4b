package integration

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// managedName is the managed plugin's NAME:TAG: the -d and --ipam-driver value.
const managedName = "dnp:latest"

var (
	pluginDirOnce sync.Once
	pluginDir     string
	pluginDirErr  error
)

// managedPluginDir builds the managed-plugin directory (config.json and
// rootfs/) with scripts/build-plugin.sh, once per test binary.
func managedPluginDir(t testing.TB) string {
	t.Helper()
	pluginDirOnce.Do(func() {
		dir, err := os.MkdirTemp("", "dnp-plugin-")
		if err != nil {
			pluginDirErr = err
			return
		}
		pluginDir = filepath.Join(dir, "plugin")
		cmd := exec.Command("bash", "../scripts/build-plugin.sh")
		cmd.Env = append(os.Environ(), "PLUGIN_DIR="+pluginDir)
		if out, err := cmd.CombinedOutput(); err != nil {
			pluginDirErr = fmt.Errorf("scripts/build-plugin.sh: %v\n%s", err, out)
		}
	})
	if pluginDirErr != nil {
		t.Fatal(pluginDirErr)
	}
	return pluginDir
}

// installManaged installs the plugin as a managed plugin on h with
// managedSettings and then settings.
// reconfigure disables h's managed plugin, sets another log level and
// enables it again, as an operator changing a setting does, and waits
// until it answers. It returns when it began.
func reconfigure(t *testing.T, h *harness.Host, p *harness.ManagedPlugin) time.Time {
	t.Helper()
	down := time.Now()
	for _, args := range [][]string{
		{"plugin", "disable", "-f", managedName},
		{"plugin", "set", managedName, "DNP_LOG_LEVEL=info"},
		{"plugin", "enable", managedName},
	} {
		h.MustDocker(t, args...)
	}
	if err := p.WaitReady(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: plugin disabled, set and enabled again in %s", h.Name, time.Since(down).Round(time.Millisecond))
	return down
}

func installManaged(t *testing.T, c *harness.Cluster, h *harness.Host, settings ...string) *harness.ManagedPlugin {
	t.Helper()
	settings = append(managedSettings(t, c, h), settings...)
	p, err := harness.InstallManagedPlugin(h, managedPluginDir(t), managedName, settings...)
	if err != nil {
		t.Fatal(err)
	}
	c.Cleanup(func() {
		if t.Failed() {
			t.Logf("managed plugin log of %s:\n%s", h.Name, p.Log(80))
		}
	})
	return p
}

// managedSettings are the settings every managed plugin of the tests
// gets: the mount sources are directories of the host's own (they must
// exist), the state mount's a shared mount as on a systemd host, and
// the Docker socket mount's is h's dockerd socket.
func managedSettings(t *testing.T, c *harness.Cluster, h *harness.Host) []string {
	t.Helper()
	conf := filepath.Join(h.Dir, "dnp-config")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	return []string{
		"config.source=" + conf,
		"state.source=" + h.SharedDir,
		"dockersock.source=" + h.DockerSock,
		"DNP_NETNS_PREFIX=" + c.Prefix + "-" + h.Name + "-",
		"DNP_LOG_LEVEL=debug",
	}
}

// overlayNS returns the overlay namespaces the managed plugin p has bound
// in its state mount (as dockerd sees it), by name, with each one's
// network namespace cookie: unlike an nsfs inode number, a cookie is never
// reused, so an equal cookie means the very same namespace.
func overlayNS(t *testing.T, p *harness.ManagedPlugin) map[string]uint64 {
	t.Helper()
	dir, err := p.Host.DockerdPath(filepath.Join(p.Host.SharedDir, "netns"))
	if err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	ns := map[string]uint64{}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		var st unix.Statfs_t
		if err := unix.Statfs(path, &st); err != nil || st.Type != unix.NSFS_MAGIC {
			continue // a file with no namespace bound on it
		}
		cookie, err := netnsCookie(path)
		if err != nil {
			t.Fatal(err)
		}
		ns[e.Name()] = cookie
	}
	return ns
}

// soNetnsCookie is SO_NETNS_COOKIE (Linux 5.14; not in x/sys/unix yet).
const soNetnsCookie = 71

// netnsCookie returns the cookie of the network namespace bound at path.
func netnsCookie(path string) (uint64, error) {
	var cookie uint64
	err := harness.DoIn(path, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("socket: %w", err)
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
		if err != nil {
			return fmt.Errorf("SO_NETNS_COOKIE: %w", err)
		}
		return nil
	})
	return cookie, err
}

func netCreateManaged(t *testing.T, h *harness.Host, name, subnet string) {
	t.Helper()
	h.MustDocker(t, "network", "create", "-d", managedName, "--ipam-driver", managedName,
		"--subnet", subnet, "-o", "overlay="+name, name)
}

// pingSeries runs count pings 200 ms apart from container and returns how
// many were answered; it runs in the background until done is read.
func pingSeries(h *harness.Host, container, ip string, count int) <-chan int {
	done := make(chan int, 1)
	go func() {
		out, _ := h.Docker("exec", container, "ping", "-q", "-i", "0.2", "-W", "1", "-c", strconv.Itoa(count), ip)
		// "N packets transmitted, M packets received, ..."
		received := -1
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) > 4 && f[1] == "packets" && f[2] == "transmitted," {
				received, _ = strconv.Atoi(f[3])
			}
		}
		done <- received
	}()
	return done
}

// TestManagedPluginEtcd runs the plugin as a managed plugin (docker plugin
// create/enable, no legacy socket) on two hosts sharing etcd: containers on
// the two hosts ping each other; a crash of one host's plugin (kill -9,
// dockerd restarts it) and then docker plugin disable -f, set and enable
// lose no traffic and keep the overlay namespace, and containers started
// afterwards join the overlay and reach the other host.
func TestManagedPluginEtcd(t *testing.T) {
	c := harness.New(t, 2, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	h1, h2 := c.Hosts[0], c.Hosts[1]
	plugins := map[string]*harness.ManagedPlugin{}
	for _, h := range c.Hosts {
		settings := []string{"DNP_STORE=" + url, "DNP_ADVERTISE_ADDR=" + h.UnderlayIP, "DNP_LIVE_TTL=10s"}
		if h == h1 {
			settings = append(settings, "DNP_METRICS_ADDR="+h.UnderlayIP+":"+metricsPort)
		}
		plugins[h.Name] = installManaged(t, c, h, settings...)
	}
	for _, h := range c.Hosts {
		if legacy, _ := filepath.Glob(filepath.Join(h.PluginDir, "*.sock")); len(legacy) > 0 {
			t.Fatalf("%s: legacy plugin sockets present, the test would not test the managed plugin: %v", h.Name, legacy)
		}
	}

	ips := map[string]string{}
	for _, h := range c.Hosts {
		netCreateManaged(t, h, "blue", "10.20.0.0/24")
		ips[h.Name] = runContainer(t, h, "blue-"+h.Name, "blue")
	}
	pingEventually(t, h1, "blue-h1", ips["h2"])
	pingEventually(t, h2, "blue-h2", ips["h1"])
	t.Logf("blue: h1 %s <-> h2 %s ping both ways", ips["h1"], ips["h2"])
	managedMetrics(t, h1, 1)

	before := overlayNS(t, plugins["h1"])
	if len(before) != 1 {
		t.Fatalf("h1: overlay namespaces in the state mount: %v; want one", before)
	}
	t.Logf("h1: overlay namespace (name: cookie) %v", before)

	// A crash of h1's plugin, with pings running both ways across it.
	const count = 40 // 8 s
	fromH1 := pingSeries(h1, "blue-h1", ips["h2"], count)
	fromH2 := pingSeries(h2, "blue-h2", ips["h1"], count)
	time.Sleep(time.Second)
	oldPID, err := plugins["h1"].Kill()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	newPID, err := plugins["h1"].WaitRestarted(oldPID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("h1: plugin pid %d killed, dockerd restarted it as pid %d in %s", oldPID, newPID, time.Since(killed).Round(time.Millisecond))
	for name, ch := range map[string]<-chan int{"h1 -> h2": fromH1, "h2 -> h1": fromH2} {
		got := <-ch
		t.Logf("%s: %d of %d pings answered across the plugin restart", name, got, count)
		if got < count-1 {
			t.Errorf("%s: %d of %d pings answered across the plugin restart; want at most one lost", name, got, count)
		}
	}
	if after := overlayNS(t, plugins["h1"]); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("h1: overlay namespaces %v after the restart; want the very same as before %v", after, before)
	}

	// h1's plugin disabled, reconfigured and enabled again, with pings
	// every 100 ms both ways: the overlay namespaces are in the state
	// mount, outside what dockerd unmounts on disable, and the other host
	// keeps h1's live key meanwhile. Not one ping may be lost.
	const lifecycle = 100 // 10 s
	runs := []*pingRun{startPingRun(h1, "blue-h1", ips["h2"], lifecycle), startPingRun(h2, "blue-h2", ips["h1"], lifecycle)}
	time.Sleep(time.Second)
	reconfigure(t, h1, plugins["h1"])
	for _, r := range runs {
		select {
		case <-r.done:
			t.Fatalf("%s ended before h1's plugin was back: raise the ping count", r.what)
		default:
		}
	}
	for _, r := range runs {
		sent, received := r.wait(t)
		t.Logf("%s: %d sent, %d received across disable, set, enable", r.what, sent, received)
		if sent != lifecycle || received != sent {
			t.Errorf("%s: lost %d of %d pings across h1's plugin disable, set, enable:\n%s", r.what, sent-received, sent, r.out)
		}
	}
	if after := overlayNS(t, plugins["h1"]); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("h1: overlay namespaces %v after disable and enable; want the very same as before %v", after, before)
	}

	// New containers after the restart, on both hosts.
	ips["h1b"] = runContainer(t, h1, "blue-h1b", "blue")
	pingEventually(t, h1, "blue-h1b", ips["h2"])
	pingEventually(t, h2, "blue-h2", ips["h1b"])
	ips["h2b"] = runContainer(t, h2, "blue-h2b", "blue")
	pingEventually(t, h1, "blue-h1b", ips["h2b"])
	t.Logf("after the restart: new h1 container %s and new h2 container %s reach the other host", ips["h1b"], ips["h2b"])
	managedMetrics(t, h1, 1) // the restarted process serves them again, counting from 0

	// Everything goes; nothing stays.
	for _, h := range c.Hosts {
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		h.MustDocker(t, "network", "rm", "blue")
	}
	for _, h := range c.Hosts {
		waitFor(t, 15*time.Second, h.Name+": overlay namespaces removed", func() bool {
			return len(overlayNS(t, plugins[h.Name])) == 0
		})
	}
	waitFor(t, 10*time.Second, "store emptied", func() bool { return len(storeKeys(t, st)) == 0 })
}

// TestManagedPluginEmbedded runs the managed plugin on one host with its
// default store, the bolt file inside the plugin's rootfs: two containers
// on an overlay ping each other, and after a crash of the plugin (dockerd
// restarts it) the network still works and remembers its allocations: a
// new container gets an address of its own and reaches the old ones.
func TestManagedPluginEmbedded(t *testing.T) {
	c := harness.New(t, 1, harness.Options{})
	h := c.Hosts[0]
	p := installManaged(t, c, h)
	if env := h.MustDocker(t, "plugin", "inspect", "--format", "{{json .Settings.Env}}", managedName); !strings.Contains(env, `"DNP_STORE=bolt:///var/lib/docker-net-plugin/state.db"`) {
		t.Fatalf("plugin env %s; want the default embedded store", env)
	}

	netCreateManaged(t, h, "green", "10.50.0.0/24")
	a := runContainer(t, h, "green-a", "green")
	b := runContainer(t, h, "green-b", "green")
	if a == b {
		t.Fatalf("both containers got %s", a)
	}
	pingEventually(t, h, "green-a", b)
	pingEventually(t, h, "green-b", a)
	t.Logf("green: %s <-> %s ping", a, b)

	db := filepath.Join(h.SharedDir, "state.db")
	if fi, err := os.Stat(db); err != nil || fi.Size() == 0 {
		t.Fatalf("embedded store in the state mount's host directory: %v", err)
	}

	before := overlayNS(t, p)
	if len(before) != 1 {
		t.Fatalf("overlay namespaces in the state mount: %v; want one", before)
	}
	old, err := p.Kill()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.WaitRestarted(old); err != nil {
		t.Fatal(err)
	}
	if after := overlayNS(t, p); fmt.Sprint(after) != fmt.Sprint(before) {
		t.Errorf("overlay namespaces %v after the restart; want the very same as before %v", after, before)
	}
	if ok, out := ping(h, "green-a", b); !ok {
		t.Errorf("after the plugin restart green-a cannot ping %s: %s", b, out)
	}
	n := runContainer(t, h, "green-c", "green")
	if n == a || n == b {
		t.Fatalf("container started after the restart got %s, already in use (a %s, b %s): allocations were lost", n, a, b)
	}
	pingEventually(t, h, "green-c", a)
	pingEventually(t, h, "green-b", n)
	t.Logf("after the restart: new container %s <-> %s", n, a)

	// Everything goes; nothing stays.
	h.MustDocker(t, "rm", "-f", "green-a", "green-b", "green-c")
	h.MustDocker(t, "network", "rm", "green")
	waitFor(t, 15*time.Second, "overlay namespace removed", func() bool { return len(overlayNS(t, p)) == 0 })
}

// managedMetrics scrapes the metrics the managed plugin on h serves
// (DNP_METRICS_ADDR from config.json) and checks they count its Joins and
// see both hosts.
func managedMetrics(t *testing.T, h *harness.Host, joins float64) {
	t.Helper()
	waitFor(t, 10*time.Second, "the managed plugin's metrics see 2 hosts", func() bool {
		return scrapeMetrics(t, h)["dnp_hosts_known"] == 2
	})
	m := scrapeMetrics(t, h)
	if got := m[`dnp_plugin_calls_total{method="NetworkDriver.Join",result="ok"}`]; got < joins {
		t.Errorf("managed plugin on %s: metrics count %v Joins, want at least %v", h.Name, got, joins)
	}
	t.Logf("managed plugin on %s: metrics at %s:%s: %v Joins, %v hosts known", h.Name, h.UnderlayIP, metricsPort,
		m[`dnp_plugin_calls_total{method="NetworkDriver.Join",result="ok"}`], m["dnp_hosts_known"])
}
