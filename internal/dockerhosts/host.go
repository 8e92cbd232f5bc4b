package dockerhosts

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Host is one Docker host of a Cluster. Its fields are read-only.
type Host struct {
	Name        string // "h1", "h2", ...
	Hostname    string // "dnpt-<id>-h1": UTS hostname (docker info Name) and netns name
	NetNS       string // path of the host's network namespace, /run/netns/<Hostname>
	UnderlayDev string // the host's underlay interface, "ul0"
	UnderlayIP  string // its address on the underlay, e.g. 192.168.200.11
	Dir         string // /tmp/dnpt-<id>/h1: data-root, exec-root, socket, logs
	DockerSock  string // dockerd's API socket
	PluginDir   string // what this dockerd sees as /run/docker/plugins
	LogFile     string // dockerd's (and its containerd's) log, kept across restarts
	// SharedDir is a directory that dockerd's mount namespace holds as a
	// shared mount, as / and /var/lib are on a systemd host: the source for
	// a plugin's bind mount with rshared propagation (the managed plugin's
	// "state" mount), so that what the plugin mounts there lands in
	// dockerd's namespace and outlives the plugin.
	SharedDir string

	cluster *Cluster
	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when cmd has exited
}

// Docker runs the docker CLI against this host's dockerd and returns its
// trimmed stdout. The error names the command and carries stderr.
func (h *Host) Docker(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), h.cluster.opts.CommandTimeout)
	defer cancel()
	return h.DockerCtx(ctx, args...)
}

// DockerCtx is Docker bounded by ctx instead of Options.CommandTimeout.
func (h *Host) DockerCtx(ctx context.Context, args ...string) (string, error) {
	return h.docker(ctx, nil, args...)
}

// Fataler stops a caller that cannot go on: a *testing.T, say.
type Fataler interface {
	Helper()
	Fatalf(format string, args ...any)
}

// MustDocker is Docker that stops t on error (t.Fatalf).
func (h *Host) MustDocker(t Fataler, args ...string) string {
	t.Helper()
	out, err := h.Docker(args...)
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	return out
}

func (h *Host) docker(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	full := append([]string{"-H", "unix://" + h.DockerSock}, args...)
	cmd := exec.CommandContext(ctx, h.cluster.Engine.Docker, full...)
	cmd.Env = h.cluster.dockerEnv()
	cmd.Stdin = stdin
	return run(ctx, cmd)
}

// DockerEnv is the environment a docker CLI (or a script that runs one)
// needs to talk to this host's dockerd: the engine's programs first on
// PATH, DOCKER_HOST, and the cluster's client config directory.
func (h *Host) DockerEnv() []string {
	return append(h.cluster.dockerEnv(), "DOCKER_HOST=unix://"+h.DockerSock)
}

// TrustRegistry makes the host's dockerd trust the TLS certificates that
// caPEM signed for the registry at addr (host:port):
// /etc/docker/certs.d/<addr>/ca.crt as dockerd sees it. dockerd reads it
// on every registry request; no restart is needed.
func (h *Host) TrustRegistry(addr string, caPEM []byte) error {
	dir := filepath.Join(h.Dir, "etc", "certs.d", addr)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), caPEM, 0o644); err != nil {
		return fmt.Errorf("%s: %w", h.Name, err)
	}
	return nil
}

// Exec runs a program in the host's network namespace (only the network
// namespace: it sees the machine's files) and returns its trimmed stdout.
func (h *Host) Exec(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), h.cluster.opts.CommandTimeout)
	defer cancel()
	return execIn(ctx, h.NetNS, args...)
}

// Command returns a command that runs a program in the host's network
// namespace, for long-running processes such as a legacy plugin listening
// in PluginDir. The caller starts and stops it. Like Exec, it sees the
// machine's files, including the root namespace's /sys: use netlink.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", append([]string{"--net=" + h.NetNS, "--", name}, args...)...)
}

// Do runs fn on a goroutine locked to the host's network namespace (for
// netlink or sockets from Go). Goroutines fn starts run elsewhere.
func (h *Host) Do(fn func() error) error { return DoIn(h.NetNS, fn) }

// StartDockerd starts the host's dockerd and waits until it answers.
// New calls it; call it yourself after StopDockerd to test a restart.
func (h *Host) StartDockerd() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cmd != nil {
		return fmt.Errorf("dockerd of %s already running", h.Name)
	}
	etcDir := filepath.Join(h.Dir, "etc")
	cgroupTmp := filepath.Join(h.Dir, "cgroup-move")
	netnsDir := filepath.Join(h.Dir, "exec", "netns")
	for _, d := range []string{h.PluginDir, filepath.Join(etcDir, "plugins"), netnsDir, cgroupTmp, h.SharedDir,
		filepath.Join(h.Dir, "data"), "/run/docker/plugins", "/etc/docker"} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", d, err)
		}
	}
	config := filepath.Join(etcDir, "daemon.json")
	daemonJSON := []byte("{}\n")
	if h.cluster.opts.DNS != nil {
		daemonJSON, _ = json.Marshal(map[string][]string{"dns": h.cluster.opts.DNS(h.cluster)})
	}
	if err := os.WriteFile(config, daemonJSON, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", config, err)
	}
	resolvConf := filepath.Join(h.Dir, "resolv.conf")
	if err := os.WriteFile(resolvConf, []byte("nameserver "+h.cluster.SwitchIP+"\n"), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", resolvConf, err)
	}
	logf, err := os.OpenFile(h.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("open dockerd log: %w", err)
	}
	defer logf.Close() // the child has its own copy

	dockerdArgs := []string{
		h.cluster.Engine.Dockerd,
		"--config-file", config,
		"--data-root", filepath.Join(h.Dir, "data"),
		"--exec-root", filepath.Join(h.Dir, "exec"),
		"--pidfile", filepath.Join(h.Dir, "docker.pid"),
		"-H", "unix://" + h.DockerSock,
		"--bridge=none",
		"--cgroup-parent=/" + h.Hostname,
	}
	dockerdArgs = append(dockerdArgs, h.cluster.opts.DockerdArgs...)

	// dockerd gets its own mount namespace (slave: nothing it mounts
	// reaches the root namespace) and UTS namespace. In it:
	//   - /run/docker/plugins and /etc/docker are this host's own directories
	//     (legacy plugin sockets and specs, key.json: engine ID);
	//   - /etc/resolv.conf names the switch, so DNS never leaves the underlay
	//     (dockerd and containers get "connection refused" at once);
	//   - /sys is a fresh sysfs, so /sys/class/net shows the host's devices,
	//     with the cgroup mounts moved over onto it;
	//   - exec-root/netns is a shared mount so containerd and dockerd see
	//     each other's netns mounts;
	//   - SharedDir is a shared mount (see Host.SharedDir).
	// Paths arrive as positional parameters: no quoting problems.
	script := `set -e
hostname "$1"
mount --bind "$2" /run/docker/plugins
mount --bind "$3" /etc/docker
mount --bind "$4" /etc/resolv.conf
mount --rbind /sys/fs/cgroup "$5"
mount -t sysfs sysfs /sys
mount --move "$5" /sys/fs/cgroup
mount --bind "$6" "$6"
mount --make-shared "$6"
mount --bind "$7" "$7"
mount --make-rshared "$7"
shift 7
exec "$@"`
	args := []string{"--net=" + h.NetNS, "--",
		"unshare", "--mount", "--uts", "--propagation", "slave", "--",
		"sh", "-c", script, "sh", h.Hostname, h.PluginDir, etcDir, resolvConf, cgroupTmp, netnsDir, h.SharedDir}
	args = append(args, dockerdArgs...)
	cmd := exec.Command("nsenter", args...)
	cmd.Env = h.cluster.dockerEnv()
	cmd.Stdout, cmd.Stderr = logf, logf
	// Own process group; killed if this process dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := startFromLockedThread(cmd); err != nil {
		return fmt.Errorf("start dockerd: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	h.cmd, h.done = cmd, done

	deadline := time.Now().Add(h.cluster.opts.ReadyTimeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-done:
			h.cmd, h.done = nil, nil
			return fmt.Errorf("dockerd exited during start (%v); log %s:\n%s", cmd.ProcessState, h.LogFile, h.logTail(30))
		default:
		}
		if _, err := os.Stat(h.DockerSock); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			_, last = h.docker(ctx, nil, "info", "--format", "{{.ServerVersion}}")
			cancel()
			if last == nil {
				return nil
			}
		} else {
			last = err
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("dockerd not ready after %s: %v; log %s:\n%s", h.cluster.opts.ReadyTimeout, last, h.LogFile, h.logTail(30))
}

// StopDockerd stops the host's dockerd: SIGTERM, then SIGKILL after 20 s.
// dockerd stops its containers on the way down unless it runs with
// --live-restore (Options.DockerdArgs).
func (h *Host) StopDockerd() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cmd == nil {
		return nil
	}
	pid := h.cmd.Process.Pid
	syscall.Kill(pid, syscall.SIGTERM)
	var err error
	select {
	case <-h.done:
	case <-time.After(20 * time.Second):
		err = fmt.Errorf("dockerd (pid %d) ignored SIGTERM for 20s, killed it", pid)
		syscall.Kill(-pid, syscall.SIGKILL)
		<-h.done
	}
	h.cmd, h.done = nil, nil
	return err
}

// emptyDocker removes containers, swarm state and managed plugins, within a
// minute in all; what is left is killed later anyway.
func (h *Host) emptyDocker() {
	h.mu.Lock()
	running := h.cmd != nil
	h.mu.Unlock()
	if !running {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if ids, err := h.docker(ctx, nil, "ps", "-aq"); err == nil && ids != "" {
		h.docker(ctx, nil, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
	}
	if state, _ := h.docker(ctx, nil, "info", "--format", "{{.Swarm.LocalNodeState}}"); state != "" && state != "inactive" {
		h.docker(ctx, nil, "swarm", "leave", "--force")
	}
	if ids, err := h.docker(ctx, nil, "plugin", "ls", "-q"); err == nil && ids != "" {
		for _, id := range strings.Fields(ids) {
			h.docker(ctx, nil, "plugin", "disable", "-f", id)
			h.docker(ctx, nil, "plugin", "rm", "-f", id)
		}
	}
}

func (h *Host) logTail(n int) string {
	b, err := os.ReadFile(h.LogFile)
	if err != nil {
		return err.Error()
	}
	return lastLines(string(b), n)
}

// dockerEnv is the environment for dockerd and the docker CLI: the engine's
// programs first on PATH, no inherited DOCKER_* settings, and a client
// config directory of the cluster's own.
func (c *Cluster) dockerEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "DOCKER_") {
			env = append(env, kv)
		}
	}
	env = append(env, "DOCKER_CONFIG="+filepath.Join(c.Dir, "docker-cli"))
	return c.Engine.Env(env)
}

// run runs cmd and returns its trimmed stdout; the error names the command
// and carries its stderr.
func run(ctx context.Context, cmd *exec.Cmd) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := strings.TrimSpace(stdout.String())
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		msg := strings.TrimSpace(stderr.String())
		if msg == "" {
			msg = out
		}
		return out, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, msg)
	}
	return out, nil
}

var (
	spawnOnce sync.Once
	spawnReqs chan spawnReq
)

type spawnReq struct {
	cmd  *exec.Cmd
	done chan error
}

// startFromLockedThread starts cmd from one OS thread that lives as long as
// the process. Pdeathsig fires when the thread that started the child
// ends, and Go ends threads that a goroutine left locked (netns code does
// that), which would kill a dockerd in the middle of a test.
func startFromLockedThread(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawnReqs = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: keeps this thread alive
			for r := range spawnReqs {
				r.done <- r.cmd.Start()
			}
		}()
	})
	done := make(chan error, 1)
	spawnReqs <- spawnReq{cmd, done}
	return <-done
}
