// Package dockerhosts runs several Docker hosts on one machine: every host
// is a network namespace with its own dockerd, and all hosts hang off one
// underlay "switch" (a Linux bridge in a namespace of its own). The
// integration tests, the benchmarks and the demo (cmd/dnp-demo) run on it;
// the tests through integration/harness, which adds testing.TB
// conveniences.
//
//	c, err := dockerhosts.New(2, dockerhosts.Options{Logf: log.Printf})
//	if err != nil { ... }
//	defer c.Close(false)
//	h1, h2 := c.Hosts[0], c.Hosts[1]
//	out, err := h1.Docker("run", "--rm", "--init", "--network", "none", dockerhosts.Image, "true")
//	_, err = h1.Exec("busybox", "ping", "-c1", h2.UnderlayIP)
//
// Everything New makes is named after a short random run id (dnpt-<id>-...),
// lives under /tmp/dnpt-<id>, and is removed by Close, which also checks
// that nothing is left. Sweep removes what killed runs left behind; New
// calls it once per process.
//
// Layout of one cluster:
//
//	netns dnpt-<id>-ul   bridge br0 with SwitchIP (192.168.250.1/24): the
//	                     "outside world" and a place for KV servers
//	netns dnpt-<id>-hN   veth ul0 with 192.168.250.(10+N)/24, default route via
//	                     SwitchIP, dockerd in its own mount and UTS namespace
//	                     with /run/docker/plugins = Host.PluginDir and
//	                     /etc/docker = <host dir>/etc
//
// The Docker engine is the one DNP_DOCKER names (see CurrentEngine): 20.10
// (Debian 12's docker.io, the default), 26.1 or 28.5, always with the docker
// CLI of the same version.
package dockerhosts

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Image is the busybox image New imports into every host (unless
// Options.NoImage). It has no registry behind it: never pull it.
const Image = "dnpt-busybox:latest"

const (
	namePrefix  = "dnpt-"
	baseDir     = "/tmp" // short on purpose: unix socket paths end up below it
	subnetBits  = "/24"
	underlayDev = "ul0"
	maxHosts    = 200

	// cmdTimeout bounds one docker or Exec command unless Options says otherwise.
	cmdTimeout = 2 * time.Minute
	// readyTimeout bounds the wait for one dockerd to answer.
	readyTimeout = 60 * time.Second
)

// Options tunes New. The zero value is what most tests want.
type Options struct {
	// DockerdArgs are extra dockerd flags for every host, e.g. "--experimental".
	DockerdArgs []string
	// NoImage skips importing Image into the hosts.
	NoImage bool
	// CommandTimeout bounds each Docker and Exec call (default 2 minutes).
	CommandTimeout time.Duration
	// DNS, when set, gives every host's daemon.json a "dns" list: the
	// servers containers use. It is called once the underlay exists, so
	// the list can name the switch (SwitchIP).
	DNS func(c *Cluster) []string
	// ReadyTimeout bounds the wait for each dockerd to answer (default 60
	// seconds; the test guest of package guest, an emulated machine, needs
	// longer).
	ReadyTimeout time.Duration
	// Engine is the version of the Docker engine to run (see
	// EngineVersion); empty: the one EngineEnv picks (CurrentEngine).
	Engine string
	// Logf receives what the cluster has to say: start and teardown times,
	// leftovers it swept, and after a failure the ends of the logs. Nil:
	// nothing is said.
	Logf func(format string, args ...any)
}

// Cluster is a set of Docker hosts on one underlay. Its fields are read-only.
type Cluster struct {
	ID          string // short random run id, part of every name
	Prefix      string // "dnpt-<ID>": the prefix of namespaces and cgroups
	Dir         string // /tmp/dnpt-<ID>: everything on disk
	SwitchNetNS string // path of the switch namespace, /run/netns/dnpt-<ID>-ul
	SwitchIP    string // the switch's own underlay address, e.g. 192.168.200.1
	RootIP      string // the test process's own underlay address once AttachRoot ran, e.g. 192.168.200.254
	Subnet      string // the underlay subnet, e.g. 192.168.250.0/24
	Hosts       []*Host

	// Engine is the Docker engine every host runs.
	Engine Engine

	opts     Options
	mu       sync.Mutex
	cleanups []func()
	nodes    int  // made by AddNode
	failed   bool // Close was told the run failed

	subnetLock *os.File // flock on the underlay subnet, released at teardown
}

var sweepOnce sync.Once

// MissingError says that something a cluster needs is missing from this
// machine, or that the process is not root. Tests skip on it (fail in CI).
type MissingError struct{ What string }

func (e *MissingError) Error() string { return e.What }

// New starts a cluster of n Docker hosts. The caller must Close it. On
// error New has removed what it made; the error is a *MissingError when not
// root or when dockerd, docker, nsenter, unshare, ip or busybox are missing.
func New(n int, opts Options) (*Cluster, error) {
	if os.Geteuid() != 0 {
		return nil, &MissingError{"needs root (network namespaces, netlink)"}
	}
	if n < 1 || n > maxHosts {
		return nil, fmt.Errorf("%d hosts; want 1..%d", n, maxHosts)
	}
	engine, err := CurrentEngine()
	if opts.Engine != "" {
		engine, err = EngineVersion(opts.Engine)
	}
	if err != nil {
		return nil, &MissingError{err.Error()}
	}
	c := &Cluster{opts: opts, Engine: engine}
	for _, prog := range []string{"nsenter", "unshare", "ip", "busybox"} {
		if !onPath(prog, "/usr/sbin", "/usr/bin", "/bin") {
			return nil, &MissingError{prog + " not found on PATH (run scripts/install-deps.sh)"}
		}
	}
	if c.opts.CommandTimeout == 0 {
		c.opts.CommandTimeout = cmdTimeout
	}
	if c.opts.ReadyTimeout == 0 {
		c.opts.ReadyTimeout = readyTimeout
	}

	sweepOnce.Do(func() {
		removed, err := Sweep()
		for _, r := range removed {
			c.logf("dockerhosts: removed leftover of a killed run: %s", r)
		}
		if err != nil {
			c.logf("dockerhosts: sweeping leftovers: %v", err)
		}
	})

	start := time.Now()
	if err := c.makeDir(); err != nil {
		return nil, err
	}
	// From here on a failure removes what exists.
	fail := func(err error) (*Cluster, error) {
		if cerr := c.Close(true); cerr != nil {
			err = fmt.Errorf("%w; %v", err, cerr)
		}
		return nil, err
	}

	if c.Engine.Compose != "" {
		// The CLI finds plugins in $DOCKER_CONFIG/cli-plugins.
		plugins := filepath.Join(c.Dir, "docker-cli", "cli-plugins")
		if err := os.MkdirAll(plugins, 0o755); err != nil {
			return fail(err)
		}
		if err := os.Symlink(c.Engine.Compose, filepath.Join(plugins, "docker-compose")); err != nil {
			return fail(err)
		}
	}

	if err := c.makeNetwork(n); err != nil {
		return fail(fmt.Errorf("cluster %s: underlay: %w", c.Prefix, err))
	}
	netDone := time.Now()

	if err := c.forEachHost(func(h *Host) error { return h.StartDockerd() }); err != nil {
		return fail(fmt.Errorf("cluster %s: %w", c.Prefix, err))
	}
	dockerDone := time.Now()

	if !opts.NoImage {
		if err := c.forEachHost(func(h *Host) error { return h.importImage() }); err != nil {
			return fail(fmt.Errorf("cluster %s: %w", c.Prefix, err))
		}
	}
	c.logf("dockerhosts: cluster %s: %d hosts on Docker %s up in %s (underlay %s, dockerd %s, image %s)",
		c.Prefix, n, c.Engine.Version, time.Since(start).Round(time.Millisecond),
		netDone.Sub(start).Round(time.Millisecond),
		dockerDone.Sub(netDone).Round(time.Millisecond),
		time.Since(dockerDone).Round(time.Millisecond))
	return c, nil
}

// onPath reports whether program name is on PATH or in one of the extra
// directories.
func onPath(name string, extra ...string) bool {
	for _, dir := range extra {
		if executable(filepath.Join(dir, name)) {
			return true
		}
	}
	_, err := exec.LookPath(name)
	return err == nil
}

func (c *Cluster) logf(format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf(format, args...)
	}
}

// Cleanup registers fn to run during Close after containers, swarm state
// and managed plugins are gone but while the dockerds still run. Use it to
// stop a legacy plugin process: stopped before Close it would be gone
// before the containers that use it are removed, and each removal would wait
// for dockerd's plugin retries. Functions run in reverse order of registration.
func (c *Cluster) Cleanup(fn func()) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cleanups = append(c.cleanups, fn)
}

// SwitchExec runs a program in the switch namespace and returns its trimmed
// stdout.
func (c *Cluster) SwitchExec(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.CommandTimeout)
	defer cancel()
	return execIn(ctx, c.SwitchNetNS, args...)
}

// makeDir picks a run id and creates /tmp/dnpt-<id> with an owner file, so
// that Sweep leaves this run alone while this process lives.
func (c *Cluster) makeDir() error {
	for range 10 {
		b := make([]byte, 3)
		if _, err := rand.Read(b); err != nil {
			return fmt.Errorf("run id: %w", err)
		}
		id := hex.EncodeToString(b)
		dir := filepath.Join(baseDir, namePrefix+id)
		if err := os.Mkdir(dir, 0o755); err != nil {
			if os.IsExist(err) {
				continue
			}
			return fmt.Errorf("create %s: %w", dir, err)
		}
		c.ID, c.Prefix, c.Dir = id, namePrefix+id, dir
		owner := strconv.Itoa(os.Getpid()) + "\n"
		if err := os.WriteFile(filepath.Join(dir, "owner"), []byte(owner), 0o644); err != nil {
			return fmt.Errorf("write owner file: %w", err)
		}
		return nil
	}
	return fmt.Errorf("no free run id in %s after 10 tries", baseDir)
}

// makeNetwork creates the switch namespace and n host namespaces wired to it.
func (c *Cluster) makeNetwork(n int) error {
	base, err := c.claimSubnet()
	if err != nil {
		return err
	}
	c.SwitchIP = base + "1"
	c.RootIP = base + "254"
	c.Subnet = base + "0" + subnetBits
	sw := c.Prefix + "-ul"
	c.SwitchNetNS = netnsPath(sw)
	if err := ip("netns", "add", sw); err != nil {
		return err
	}
	steps := [][]string{
		{"-n", sw, "link", "set", "lo", "up"},
		{"-n", sw, "link", "add", "br0", "type", "bridge"},
		{"-n", sw, "addr", "add", c.SwitchIP + subnetBits, "dev", "br0"},
		{"-n", sw, "link", "set", "br0", "up"},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return err
		}
	}
	// Nothing leaves the underlay: the switch answers packets for any other
	// address with ICMP "prohibited", so a stray connection fails at once
	// instead of timing out.
	if _, err := ExecIn(c.SwitchNetNS, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"); err != nil {
		return err
	}
	if err := ip("-n", sw, "route", "add", "prohibit", "default"); err != nil {
		return err
	}
	for i := 1; i <= n; i++ {
		h := &Host{
			Name:        "h" + strconv.Itoa(i),
			UnderlayDev: underlayDev,
			UnderlayIP:  base + strconv.Itoa(10+i),
			cluster:     c,
		}
		h.Hostname = c.Prefix + "-" + h.Name
		h.NetNS = netnsPath(h.Hostname)
		h.Dir = filepath.Join(c.Dir, h.Name)
		h.DockerSock = filepath.Join(h.Dir, "docker.sock")
		h.PluginDir = filepath.Join(h.Dir, "plugins")
		h.SharedDir = filepath.Join(h.Dir, "shared")
		h.LogFile = filepath.Join(h.Dir, "dockerd.log")
		c.Hosts = append(c.Hosts, h)

		if err := ip("netns", "add", h.Hostname); err != nil {
			return err
		}
		// Both veth ends are created inside namespaces: no name in the
		// root namespace, so parallel clusters cannot collide.
		steps := [][]string{
			{"-n", h.Hostname, "link", "set", "lo", "up"},
			{"-n", sw, "link", "add", h.Name, "type", "veth", "peer", "name", underlayDev, "netns", h.Hostname},
			{"-n", sw, "link", "set", h.Name, "master", "br0", "up"},
			{"-n", h.Hostname, "addr", "add", h.UnderlayIP + subnetBits, "dev", underlayDev},
			{"-n", h.Hostname, "link", "set", underlayDev, "up"},
			{"-n", h.Hostname, "route", "add", "default", "via", c.SwitchIP},
		}
		for _, s := range steps {
			if err := ip(s...); err != nil {
				return err
			}
		}
	}
	return nil
}

// forEachHost runs fn for all hosts at once and returns the errors joined.
func (c *Cluster) forEachHost(fn func(h *Host) error) error {
	errs := make([]error, len(c.Hosts))
	var wg sync.WaitGroup
	for i, h := range c.Hosts {
		wg.Go(func() {
			if err := fn(h); err != nil {
				errs[i] = fmt.Errorf("%s: %w", h.Name, err)
			}
		})
	}
	wg.Wait()
	var msgs []string
	for _, err := range errs {
		if err != nil {
			msgs = append(msgs, err.Error())
		}
	}
	if len(msgs) > 0 {
		return fmt.Errorf("%s", strings.Join(msgs, "; "))
	}
	return nil
}

// Close removes everything the cluster made: containers, swarm state and
// plugins, then the Cleanup functions run, then dockerd, its processes,
// cgroups, namespaces, mounts and files. failed says the run failed: the
// end of every dockerd log is then shown (Options.Logf) and the logs are
// kept in /tmp/dnpt-logs-<id> (also when KeepLogsEnv is set). It returns
// what went wrong, including anything left behind: leftovers would disturb
// later runs.
func (c *Cluster) Close(failed bool) error {
	start := time.Now()
	c.mu.Lock()
	c.failed = failed
	c.mu.Unlock()
	if failed {
		c.showLogs()
	}

	c.forEachHost(func(h *Host) error { h.emptyDocker(); return nil })

	c.mu.Lock()
	cleanups := c.cleanups
	c.cleanups = nil
	c.mu.Unlock()
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}

	var errs []error
	if err := c.forEachHost(func(h *Host) error { return h.StopDockerd() }); err != nil {
		errs = append(errs, fmt.Errorf("dockerhosts: teardown %s: %w", c.Prefix, err))
	}
	if failed || len(errs) > 0 || os.Getenv(KeepLogsEnv) != "" {
		c.keepLogs()
	}
	// Kill what dockerd left (shims, containers, plugins), drop cgroups,
	// namespaces, mounts and files.
	if err := removeRun(c.ID); err != nil {
		errs = append(errs, fmt.Errorf("dockerhosts: teardown %s: %w", c.Prefix, err))
	}
	if c.subnetLock != nil {
		c.subnetLock.Close() // after the switch namespace (and any route to the subnet) is gone
	}
	if left := Leftovers(c.ID); len(left) > 0 {
		errs = append(errs, fmt.Errorf("dockerhosts: teardown %s left behind:\n  %s", c.Prefix, strings.Join(left, "\n  ")))
	}
	c.logf("dockerhosts: cluster %s torn down in %s", c.Prefix, time.Since(start).Round(time.Millisecond))
	return errors.Join(errs...)
}

// closingFailed reports whether Close was told that the run failed.
func (c *Cluster) closingFailed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failed
}

// showLogs prints the tail of every dockerd log.
func (c *Cluster) showLogs() {
	for _, h := range c.Hosts {
		c.logf("dockerhosts: %s: last lines of %s:\n%s", h.Name, h.LogFile, h.logTail(40))
	}
}

// KeepLogsEnv names the environment variable that, when set, keeps the
// dockerd logs of passing runs too (to look for warnings).
const KeepLogsEnv = "DNP_KEEP_LOGS"

// keepLogs copies the dockerd logs to /tmp/dnpt-logs-<id>, which Close
// does not remove.
func (c *Cluster) keepLogs() {
	keep := filepath.Join(baseDir, "dnpt-logs-"+c.ID)
	if err := os.MkdirAll(keep, 0o755); err != nil {
		c.logf("dockerhosts: keep logs: %v", err)
		return
	}
	for _, h := range c.Hosts {
		b, err := os.ReadFile(h.LogFile)
		if err != nil {
			continue
		}
		dst := filepath.Join(keep, h.Name+"-dockerd.log")
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			c.logf("dockerhosts: keep logs: %v", err)
			return
		}
	}
	c.logf("dockerhosts: full dockerd logs kept in %s", keep)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func netnsPath(name string) string { return "/run/netns/" + name }

// claimSubnet picks an underlay subnet 192.168.N.0/24 no other live
// cluster on this machine uses (an flock held for the cluster's life), so
// that clusters attached to the root namespace never share a route there.
func (c *Cluster) claimSubnet() (string, error) {
	for n := 200; n < 250; n++ {
		f, err := os.OpenFile(filepath.Join(baseDir, fmt.Sprintf("dnpt-subnet-%d.lock", n)), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return "", fmt.Errorf("claim underlay subnet: %w", err)
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			continue
		}
		c.subnetLock = f
		return fmt.Sprintf("192.168.%d.", n), nil
	}
	return "", errors.New("claim underlay subnet: all of 192.168.200-249.0/24 are in use by other clusters")
}

// AttachRoot connects the test process's own (root) network namespace to
// the underlay with address c.RootIP, so that servers the test runs there
// (etcd, ZooKeeper, Consul) are reachable by every host and by the test's
// own clients. The link goes away with the switch namespace.
func (c *Cluster) AttachRoot() error {
	sw := c.Prefix + "-ul"
	root := c.Prefix + "-r" // at most 15 bytes: dnpt-<6 hex>-r
	steps := [][]string{
		{"-n", sw, "link", "add", "root", "type", "veth", "peer", "name", root, "netns", strconv.Itoa(os.Getpid())},
		{"-n", sw, "link", "set", "root", "master", "br0", "up"},
		{"addr", "add", c.RootIP + subnetBits, "dev", root},
		{"link", "set", root, "up"},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return fmt.Errorf("attach root namespace: %w", err)
		}
	}
	return nil
}

// Node is a bare network namespace on the underlay (no dockerd), for
// servers that must be reachable by every host at an address of their own,
// such as the members of a store cluster: killing a member's process then
// leaves its address in place (peers get "connection refused" at once, as
// with a real crashed server).
type Node struct {
	Name       string // as given to AddNode
	NetNS      string // path of its namespace, /run/netns/dnpt-<id>-<name>
	UnderlayIP string // its underlay address, e.g. 192.168.200.221
}

// maxNodes bounds AddNode: node k gets the underlay address .(220+k).
const maxNodes = 30

// AddNode makes a namespace named dnpt-<id>-<name> with a veth to the
// underlay switch and the next free node address (192.168.N.221, .222,
// ...), lo up and a default route via the switch. Teardown removes it
// with the rest of the run (after Cleanup functions ran).
func (c *Cluster) AddNode(name string) (*Node, error) {
	c.mu.Lock()
	c.nodes++
	k := c.nodes
	c.mu.Unlock()
	if k > maxNodes {
		return nil, fmt.Errorf("add node %s: at most %d nodes per cluster", name, maxNodes)
	}
	base := strings.TrimSuffix(c.SwitchIP, "1")
	n := &Node{Name: name, UnderlayIP: base + strconv.Itoa(220+k)}
	nsName := c.Prefix + "-" + name
	n.NetNS = netnsPath(nsName)
	sw := c.Prefix + "-ul"
	port := "n" + strconv.Itoa(k) // the switch's end, like h1, h2 for hosts
	steps := [][]string{
		{"netns", "add", nsName},
		{"-n", nsName, "link", "set", "lo", "up"},
		{"-n", sw, "link", "add", port, "type", "veth", "peer", "name", underlayDev, "netns", nsName},
		{"-n", sw, "link", "set", port, "master", "br0", "up"},
		{"-n", nsName, "addr", "add", n.UnderlayIP + subnetBits, "dev", underlayDev},
		{"-n", nsName, "link", "set", underlayDev, "up"},
		{"-n", nsName, "route", "add", "default", "via", c.SwitchIP},
	}
	for _, s := range steps {
		if err := ip(s...); err != nil {
			return nil, fmt.Errorf("add node %s: %w", name, err)
		}
	}
	return n, nil
}
