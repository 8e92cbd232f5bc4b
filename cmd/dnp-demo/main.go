// Command dnp-demo shows the plugin working, on one machine, as a managed
// Docker plugin: it starts Docker hosts in network namespaces (package
// dockerhosts, which the integration tests use too), installs the plugin
// from a plugin directory (make plugin) in each, and has containers ping
// each other:
//
//   - one host on the embedded default store (bolt inside the plugin);
//   - three hosts sharing a real etcd, one overlay across them, and a crash
//     of one host's plugin (kill -9) that traffic does not notice.
//
// Everything it starts is removed at the end, also on failure or Ctrl-C.
// Run it as root after `make deps`: `make demo`, or
// `go run ./cmd/dnp-demo -plugin-dir bin/plugin`.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/dockerhosts"
	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// pluginName is the managed plugin's NAME:TAG: the -d and --ipam-driver value.
const pluginName = "dnp:latest"

var (
	pluginDir   = flag.String("plugin-dir", "bin/plugin", "managed plugin directory (config.json and rootfs/), made by `make plugin`")
	hostCount   = flag.Int("hosts", 3, "Docker hosts sharing etcd in part 2")
	verbose     = flag.Bool("v", false, "show the Docker hosts' own log lines")
	interrupted atomic.Bool
	start       = time.Now()
	// engine is the Docker engine every host runs: DNP_DOCKER's, else the
	// newest installed.
	engine dockerhosts.Engine
)

func main() {
	flag.Parse()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		interrupted.Store(true)
		fmt.Println("\n!! interrupted: stopping after the current command, then cleaning up (Ctrl-C again to quit at once)")
		<-sigs
		fmt.Println("!! quitting without cleanup; the next run of the demo or the tests removes what is left")
		os.Exit(130)
	}()

	ok := check() &&
		part("Part 1: one Docker host, embedded store (bolt file in the plugin's state mount)", embedded) &&
		part(fmt.Sprintf("Part 2: %d Docker hosts sharing etcd, one overlay across them", *hostCount), multiHost)
	if !ok {
		what := "FAILED"
		if interrupted.Load() {
			what = "INTERRUPTED"
		}
		fmt.Printf("\nDEMO %s after %s\n", what, since(start))
		os.Exit(1)
	}
	fmt.Printf("\nDemo finished in %s: every ping answered, everything removed.\n", since(start))
}

// check looks for what the demo needs before starting anything.
func check() bool {
	if os.Geteuid() != 0 {
		fmt.Println("dnp-demo: run as root (it creates network namespaces and starts dockerd)")
		return false
	}
	for _, f := range []string{"config.json", "rootfs/docker-net-plugin"} {
		if _, err := os.Stat(filepath.Join(*pluginDir, f)); err != nil {
			fmt.Printf("dnp-demo: no plugin in %s (%v): run `make plugin` first\n", *pluginDir, err)
			return false
		}
	}
	if *hostCount < 2 || *hostCount > 10 {
		fmt.Println("dnp-demo: -hosts wants 2..10")
		return false
	}
	var err error
	how := "the newest installed"
	if os.Getenv(dockerhosts.EngineEnv) != "" {
		engine, err = dockerhosts.CurrentEngine()
		how = "set by " + dockerhosts.EngineEnv
	} else {
		engine, err = dockerhosts.NewestEngine()
	}
	if err != nil {
		fmt.Printf("dnp-demo: %v\n", err)
		return false
	}
	fmt.Printf("Docker engine: %s (%s; dockerd %s)\n", engine.Version, how, engine.Dockerd)
	return true
}

// part runs one part of the demo with its own cleanups, which run when it
// ends, however it ends.
func part(title string, fn func(r *runner)) bool {
	fmt.Printf("\n=== %s\n", title)
	r := &runner{late: &runner{}}
	partStart := time.Now()
	func() {
		defer func() {
			if v := recover(); v != nil && v != errAbort {
				panic(v)
			}
		}()
		fn(r)
	}()
	step("cleaning up (containers, networks, plugins, dockerd, namespaces)")
	r.runCleanups()
	r.late.runCleanups()
	if r.Failed() || r.late.Failed() {
		if interrupted.Load() {
			fmt.Println("   interrupted; cleaned up")
		}
		return false
	}
	done("nothing left behind (containers, plugins, dockerd, namespaces, mounts, cgroups); part took %s", since(partStart))
	return true
}

// embedded: one host, the plugin with its defaults (no DNP_STORE).
func embedded(r *runner) {
	step("starting 1 Docker host (dockerd %s in its own network namespace)", engine.Version)
	c := r.hosts(1)
	h := c.Hosts[0]
	done("host %s up, underlay address %s", h.Name, h.UnderlayIP)

	install(r, c, h)
	network(r, h, "demo", "10.60.0.0/24")
	a := container(r, h, "demo-1", "demo")
	b := container(r, h, "demo-2", "demo")
	pingReport(r, h, "demo-1", b)
	pingReport(r, h, "demo-2", a)

	step("kill -9 the plugin process (dockerd restarts it; state is in the bolt file)")
	restart(r, h)
	n := container(r, h, "demo-3", "demo")
	if n == a || n == b {
		r.Fatalf("the container started after the restart got %s, already in use", n)
	}
	pingReport(r, h, "demo-3", a)

	removeAll(r, h, "demo")
}

// multiHost: n hosts, etcd in the root namespace on the underlay.
func multiHost(r *runner) {
	step("starting %d Docker hosts (dockerd %s), each in its own network namespace, on one underlay", *hostCount, engine.Version)
	c := r.hosts(*hostCount)
	for _, h := range c.Hosts {
		done("host %s up, underlay address %s", h.Name, h.UnderlayIP)
	}

	step("starting etcd (a real server) on the underlay at %s", c.RootIP)
	if err := c.AttachRoot(); err != nil {
		r.Fatalf("attach to the underlay: %v", err)
	}
	// Stopped after the hosts: their plugins need the store until the end.
	srv := r.late.etcd(c.RootIP)
	url := srv.URL("dnp-demo-" + c.ID)
	done("etcd ready: DNP_STORE=%s", url)

	for _, h := range c.Hosts {
		install(r, c, h, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP)
	}
	ips := map[string]string{}
	names := map[string]string{}
	for _, h := range c.Hosts {
		network(r, h, "blue", "10.20.0.0/24")
		names[h.Name] = "blue-" + h.Name
		ips[h.Name] = container(r, h, names[h.Name], "blue")
	}
	step("every container pings every other, across hosts (VXLAN over the underlay)")
	for _, from := range c.Hosts {
		for _, to := range c.Hosts {
			if from != to {
				pingReport(r, from, names[from.Name], ips[to.Name])
			}
		}
	}

	h1, h2 := c.Hosts[0], c.Hosts[1]
	step("kill -9 the plugin on %s while %s pings %s", h1.Name, names[h1.Name], ips[h2.Name])
	series := make(chan string, 1)
	go func() {
		out, _ := h1.Docker("exec", names[h1.Name], "ping", "-q", "-i", "0.2", "-W", "1", "-c", "25", ips[h2.Name])
		series <- out
	}()
	time.Sleep(time.Second)
	restart(r, h1)
	out := <-series
	sent, got, _ := pingStats(out)
	if got < sent-1 || sent == 0 {
		r.Fatalf("across the plugin restart only %d of %d pings were answered:\n%s", got, sent, out)
	}
	done("across the restart: %d of %d pings answered", got, sent)
	newIP := container(r, h1, names[h1.Name]+"-new", "blue")
	pingReport(r, h1, names[h1.Name]+"-new", ips[h2.Name])
	pingReport(r, h2, names[h2.Name], newIP)

	for _, h := range c.Hosts {
		removeAll(r, h, "blue")
	}
}

// install installs the plugin as a managed plugin on h.
func install(r *runner, c *dockerhosts.Cluster, h *dockerhosts.Host, settings ...string) {
	r.abortIfInterrupted()
	conf := filepath.Join(h.Dir, "dnp-config")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		r.Fatalf("%v", err)
	}
	// The mount sources must exist, the state mount's on a shared mount
	// (the host's SharedDir; /var/lib on a real host), the Docker socket
	// mount's is this host's dockerd socket; the overlay namespaces get a
	// per-host name prefix (all hosts share one machine).
	fixed := []string{"config.source=" + conf, "state.source=" + h.SharedDir, "dockersock.source=" + h.DockerSock,
		"DNP_NETNS_PREFIX=" + c.Prefix + "-" + h.Name + "-"}
	shown := strings.Join(settings, " ")
	settings = append(fixed, settings...)
	if shown == "" {
		shown = "(defaults: DNP_STORE=bolt:///var/lib/docker-net-plugin/state.db, in the state mount)"
	}
	step("%s: docker plugin create %s %s; plugin set %s; plugin enable", h.Name, pluginName, *pluginDir, shown)
	t0 := time.Now()
	p, err := dockerhosts.InstallManagedPlugin(h, *pluginDir, pluginName, settings...)
	if err != nil {
		r.Fatalf("%v", err)
	}
	r.plugins = append(r.plugins, p)
	done("%s: plugin enabled in %s (id %.12s)", h.Name, since(t0), p.ID)
}

// restart kills the plugin on h and waits until dockerd has restarted it.
func restart(r *runner, h *dockerhosts.Host) {
	r.abortIfInterrupted()
	p := r.plugin(h)
	old, err := p.Kill()
	if err != nil {
		r.Fatalf("%v", err)
	}
	t0 := time.Now()
	pid, err := p.WaitRestarted(old)
	if err != nil {
		r.Fatalf("%v", err)
	}
	done("%s: plugin pid %d killed; dockerd restarted it as pid %d in %s", h.Name, old, pid, since(t0))
}

func network(r *runner, h *dockerhosts.Host, name, subnet string) {
	r.abortIfInterrupted()
	args := []string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", subnet, "-o", "overlay=" + name, name}
	step("%s: docker %s", h.Name, strings.Join(args, " "))
	if _, err := h.Docker(args...); err != nil {
		r.Fatalf("%v", err)
	}
}

// container starts a container on network and returns its address.
func container(r *runner, h *dockerhosts.Host, name, network string) string {
	r.abortIfInterrupted()
	if _, err := h.Docker("run", "-d", "--init", "--name", name, "--network", network, dockerhosts.Image, "sleep", "3600"); err != nil {
		r.Fatalf("%v", err)
	}
	ip, err := h.Docker("inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", name)
	if err != nil || net.ParseIP(ip) == nil {
		r.Fatalf("%s: container %s has no address on %s: %q %v", h.Name, name, network, ip, err)
	}
	done("%s: docker run --network %s --name %s  ->  %s", h.Name, network, name, ip)
	return ip
}

// pingReport waits until container on h reaches ip (peers converge through
// the store within moments), then sends 3 pings and prints the result.
func pingReport(r *runner, h *dockerhosts.Host, container, ip string) {
	deadline := time.Now().Add(20 * time.Second)
	for {
		r.abortIfInterrupted()
		if _, err := h.Docker("exec", container, "ping", "-c", "1", "-W", "1", ip); err == nil {
			break
		}
		if time.Now().After(deadline) {
			r.Fatalf("%s: %s cannot ping %s", h.Name, container, ip)
		}
		time.Sleep(300 * time.Millisecond)
	}
	out, err := h.Docker("exec", container, "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", ip)
	sent, got, avg := pingStats(out)
	if err != nil || got != sent {
		r.Fatalf("%s: %s -> %s: %d of %d answered: %v\n%s", h.Name, container, ip, got, sent, err, out)
	}
	done("ping %s/%s -> %-10s %d/%d answered, avg %s ms", h.Name, container, ip, got, sent, avg)
}

// pingStats reads busybox ping's summary.
func pingStats(out string) (sent, received int, avg string) {
	avg = "?"
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[1] == "packets" && f[2] == "transmitted," {
			sent, _ = strconv.Atoi(f[0])
			received, _ = strconv.Atoi(f[3])
		}
		if strings.HasPrefix(line, "round-trip") && len(f) >= 4 {
			if v := strings.Split(f[3], "/"); len(v) == 3 {
				avg = v[1]
			}
		}
	}
	return sent, received, avg
}

// removeAll removes the containers, the network and the plugin on h, as a
// user would (teardown would force it all anyway).
func removeAll(r *runner, h *dockerhosts.Host, network string) {
	r.abortIfInterrupted()
	if ids, err := h.Docker("ps", "-aq"); err == nil && ids != "" {
		if _, err := h.Docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...); err != nil {
			r.Fatalf("%v", err)
		}
	}
	if _, err := h.Docker("network", "rm", network); err != nil {
		r.Fatalf("%v", err)
	}
	// With no network left the plugin can be disabled without -f.
	for _, args := range [][]string{{"plugin", "disable", pluginName}, {"plugin", "rm", pluginName}} {
		if _, err := h.Docker(args...); err != nil {
			r.Fatalf("%v", err)
		}
	}
	done("%s: containers and network %s removed; plugin disabled and removed", h.Name, network)
}

func step(format string, args ...any) {
	fmt.Printf("[%6s] %s\n", since(start), fmt.Sprintf(format, args...))
}

func done(format string, args ...any) {
	fmt.Printf("         ok  %s\n", fmt.Sprintf(format, args...))
}

func since(t time.Time) string { return time.Since(t).Round(100 * time.Millisecond).String() }

// errAbort ends a part early (Fatalf, a missing dependency, or Ctrl-C).
var errAbort = errors.New("demo step failed")

// runner runs one part of the demo: it says what failed, and holds the
// cleanups that undo the part, run last first when it ends, however it
// ends.
type runner struct {
	late *runner // cleanups that run after this runner's

	mu       sync.Mutex
	cleanups []func()
	failed   bool
	plugins  []*dockerhosts.ManagedPlugin
}

// hosts starts n Docker hosts and registers their removal.
func (r *runner) hosts(n int) *dockerhosts.Cluster {
	c, err := dockerhosts.New(n, dockerhosts.Options{Engine: engine.Version, Logf: r.Logf})
	var missing *dockerhosts.MissingError
	if errors.As(err, &missing) {
		r.Fatalf("cannot run: %v (run `make deps` as root)", err)
	}
	if err != nil {
		r.Fatalf("Docker hosts: %v", err)
	}
	r.Cleanup(func() {
		if err := c.Close(r.Failed()); err != nil {
			r.Errorf("%v", err)
		}
	})
	return c
}

// etcd starts a one-member etcd listening on ip and registers its stop.
func (r *runner) etcd(ip string) *kvserver.Server {
	bin := "/usr/bin/etcd"
	if _, err := os.Stat(bin); err != nil {
		if bin, err = exec.LookPath("etcd"); err != nil {
			r.Fatalf("cannot run: etcd not found (run `make deps` as root)")
		}
	}
	srv, err := kvserver.Etcd(bin, r.TempDir(), kvserver.Options{IP: ip})
	if err != nil {
		r.Fatalf("etcd: %v", err)
	}
	r.Cleanup(srv.Stop)
	if err := srv.Start(); err != nil {
		r.Fatalf("start etcd: %v", err)
	}
	return srv
}

// Logf shows the Docker hosts' log lines with -v, and after a failure
// (they then hold the dockerd logs), but not after Ctrl-C.
func (r *runner) Logf(format string, args ...any) {
	if *verbose || (r.Failed() && !interrupted.Load()) {
		msg := strings.ReplaceAll(fmt.Sprintf(format, args...), "\n", "\n             ")
		fmt.Printf("         ..  %s\n", msg)
	}
}

// Errorf says what failed; the part fails but goes on.
func (r *runner) Errorf(format string, args ...any) {
	r.mu.Lock()
	r.failed = true
	r.mu.Unlock()
	if interrupted.Load() {
		fmt.Printf("   stopped: %s\n", fmt.Sprintf(format, args...))
		return
	}
	fmt.Printf("   ERROR %s\n", fmt.Sprintf(format, args...))
}

// Fatalf says what failed and ends the part (its cleanups still run).
func (r *runner) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	panic(errAbort)
}

func (r *runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

func (r *runner) Cleanup(fn func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, fn)
}

func (r *runner) TempDir() string {
	dir, err := os.MkdirTemp("", "dnp-demo-")
	if err != nil {
		r.Fatalf("temp dir: %v", err)
	}
	r.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// runCleanups runs the registered cleanups, last first, like testing does.
// A cleanup that calls Fatalf ends only itself.
func (r *runner) runCleanups() {
	for {
		r.mu.Lock()
		n := len(r.cleanups)
		if n == 0 {
			r.mu.Unlock()
			return
		}
		fn := r.cleanups[n-1]
		r.cleanups = r.cleanups[:n-1]
		r.mu.Unlock()
		func() {
			defer func() {
				if v := recover(); v != nil && v != errAbort {
					panic(v)
				}
			}()
			fn()
		}()
	}
}

func (r *runner) abortIfInterrupted() {
	if interrupted.Load() {
		r.Fatalf("interrupted")
	}
}

// plugin returns the managed plugin installed on h.
func (r *runner) plugin(h *dockerhosts.Host) *dockerhosts.ManagedPlugin {
	for _, p := range r.plugins {
		if p.Host == h {
			return p
		}
	}
	r.Fatalf("no plugin installed on %s", h.Name)
	return nil
}
