// Package testenv starts the real things tests need (KV servers, network
// namespaces) and removes them when the test ends, even on failure.
//
// A missing dependency skips the test with the reason, except in CI
// (CI=true), where it fails it: CI must never pass by skipping.
package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
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
	port, err := kvserver.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// Process is a server the test started (a kvserver.Process); it can be
// stopped and started again with the same data (to test outages and watch
// resumption).
type Process struct{ *kvserver.Process }

// Start runs the server and waits until Ready succeeds.
func (p *Process) Start(t testing.TB) {
	t.Helper()
	if err := p.Process.Start(); err != nil {
		t.Fatalf("start %s: %v", p.Name, err)
	}
}

func (p *Process) start() error { return p.Process.Start() }

// Stop ends the server (SIGTERM, then SIGKILL after 10s) and waits for it.
func (p *Process) Stop(t testing.TB) {
	t.Helper()
	p.Process.Stop()
}

// Kill ends the server at once with SIGKILL.
func (p *Process) Kill(t testing.TB) {
	t.Helper()
	p.Process.Kill()
}

// Context returns a context that ends with the test, bounded by d.
func Context(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// ServerOptions says where a KV server listens.
type ServerOptions = kvserver.Options

// Server is a KV server started for a test: stop and start it with the
// embedded Process; its data survives a restart.
type Server struct {
	*Process
	Scheme string // etcd, consul or zk
	Addr   string // host:port clients use
}

// URL is a store URL for this server under prefix.
func (s *Server) URL(prefix string) string { return s.Scheme + "://" + s.Addr + "/" + prefix }

// StartServer starts a server of kind etcd, consul or zk, as StartEtcd,
// StartConsul or StartZooKeeper do.
func StartServer(t testing.TB, kind string, o ServerOptions) *Server {
	t.Helper()
	switch kind {
	case "etcd":
		return StartEtcd(t, o)
	case "consul":
		return StartConsul(t, o)
	case "zk":
		return StartZooKeeper(t, o)
	}
	t.Fatalf("unknown store kind %q (etcd, consul or zk)", kind)
	return nil
}
