// Package testenv starts the real things tests need (KV servers, network
// namespaces) and removes them when the test ends, even on failure.
//
// A missing dependency skips the test with the reason, except in CI
// (CI=true), where it fails it: CI must never pass by skipping.
package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// InCI reports whether the tests run in CI, where nothing may be skipped.
func InCI() bool { v, _ := strconv.ParseBool(os.Getenv("CI")); return v }

// Missing skips t (or fails it in CI) because a dependency is missing.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if InCI() {
		t.Fatalf("missing dependency (CI=true, so this fails): %s", msg)
	}
	t.Skipf("SKIP, missing dependency: %s", msg)
}

// NeedRoot skips (or in CI fails) unless the test runs as root.
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "needs root (network namespaces, netlink)")
	}
}

// LookPath finds a program on PATH or in the extra directories, or reports it missing.
func LookPath(t testing.TB, name string, extra ...string) string {
	t.Helper()
	for _, dir := range extra {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s not found on PATH (run scripts/install-deps.sh)", name)
	}
	return p
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// Process is a server the test started; it can be stopped and started again
// with the same data (to test outages and watch resumption).
type Process struct {
	Name  string
	Args  []string      // program and arguments
	Env   []string      // extra environment
	Dir   string        // working directory
	Ready func() error  // nil once the server answers
	Wait  time.Duration // how long Start waits for Ready (default 30s)

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  *os.File
}

// Start runs the server and waits until Ready succeeds.
func (p *Process) Start(t testing.TB) {
	t.Helper()
	if err := p.start(); err != nil {
		t.Fatalf("start %s: %v", p.Name, err)
	}
}

func (p *Process) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return fmt.Errorf("%s already running", p.Name)
	}
	logPath := filepath.Join(p.Dir, p.Name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.Args[0], p.Args[1:]...)
	cmd.Dir = p.Dir
	cmd.Env = append(os.Environ(), p.Env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	// Its own process group, so Stop reaches its children too. No
	// Pdeathsig: it fires when the forking OS thread ends, and Go ends
	// threads that netns code left locked, which would kill the server
	// mid-test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.cmd, p.done, p.log = cmd, done, lf
	wait := p.Wait
	if wait == 0 {
		wait = 30 * time.Second
	}
	deadline := time.Now().Add(wait)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-done:
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s exited during start; log:\n%s", p.Name, tail(out, 3000))
		default:
		}
		if p.Ready == nil {
			return nil
		}
		if last = p.Ready(); last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, _ := os.ReadFile(logPath)
	return fmt.Errorf("%s not ready after %s: %v; log:\n%s", p.Name, wait, last, tail(out, 3000))
}

// Stop ends the server (SIGTERM, then SIGKILL after 10s) and waits for it.
func (p *Process) Stop(t testing.TB) {
	t.Helper()
	p.stop(syscall.SIGTERM)
}

// Kill ends the server at once with SIGKILL.
func (p *Process) Kill(t testing.TB) {
	t.Helper()
	p.stop(syscall.SIGKILL)
}

func (p *Process) stop(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	p.log.Close()
	p.cmd, p.done, p.log = nil, nil, nil
}

// Running reports whether the server process is up.
func (p *Process) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// DialReady is a Ready check that succeeds once addr accepts TCP connections.
func DialReady(addr string) func() error {
	return func() error {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return err
		}
		return c.Close()
	}
}

// Context returns a context that ends with the test, bounded by d.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ServerOptions says where a KV server listens.
type ServerOptions struct {
	IP    string // listen address; default 127.0.0.1
	NetNS string // run inside this network namespace (a path such as /run/netns/x); default: the test's own
}

func (o ServerOptions) ip() string {
	if o.IP == "" {
		return "127.0.0.1"
	}
	return o.IP
}

// wrap prefixes args so the program runs inside o.NetNS, if set.
func (o ServerOptions) wrap(args []string) []string {
	if o.NetNS == "" {
		return args
	}
	return append([]string{"nsenter", "--net=" + o.NetNS, "--"}, args...)
}

// Server is a KV server started for a test: stop and start it with the
// embedded Process; its data survives a restart.
type Server struct {
	*Process
	Scheme string // etcd, consul or zk
	Addr   string // host:port clients use
}

// URL is a store URL for this server under prefix.
func (s *Server) URL(prefix string) string { return s.Scheme + "://" + s.Addr + "/" + prefix }
