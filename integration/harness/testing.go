// Package harness is the test side of internal/dockerhosts (Docker hosts
// in network namespaces): the same clusters, with testing.TB conveniences.
// New skips a test whose machine lacks what a cluster needs (fails it in
// CI, see testenv.Missing), fails it on any other error, and closes the
// cluster with t.Cleanup, keeping the logs when the test failed; the
// legacy plugin helpers fail the test instead of returning errors.
//
//	c := harness.New(t, 2, harness.Options{})
//	h1, h2 := c.Hosts[0], c.Hosts[1]
//	out := h1.MustDocker(t, "run", "--rm", "--init", "--network", "none", harness.Image, "true")
//	_, err := h1.Exec("busybox", "ping", "-c1", h2.UnderlayIP)
//
// Everything else is dockerhosts' own, under the names tests know.
package harness

import (
	"errors"
	"testing"

	"github.com/dnplabs/docker-net-plugin/internal/dockerhosts"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// The cluster's types; see package dockerhosts.
type (
	Cluster       = dockerhosts.Cluster
	Host          = dockerhosts.Host
	Options       = dockerhosts.Options
	Node          = dockerhosts.Node
	Engine        = dockerhosts.Engine
	ManagedPlugin = dockerhosts.ManagedPlugin
)

// Names and programs every cluster shares; see package dockerhosts.
const (
	Image        = dockerhosts.Image
	PluginName   = dockerhosts.PluginName
	McastTool    = dockerhosts.McastTool
	McastToolEnv = dockerhosts.McastToolEnv
	KeepLogsEnv  = dockerhosts.KeepLogsEnv
	EngineEnv    = dockerhosts.EngineEnv
)

// New starts a cluster of n Docker hosts and closes it with t.Cleanup,
// also when the test fails (the dockerd logs are then shown and kept). It
// skips the test (fails it in CI) when not root or when dockerd, docker,
// nsenter, unshare, ip or busybox are missing. Without Options.Logf the
// cluster logs with t.Logf.
func New(t testing.TB, n int, opts Options) *Cluster {
	t.Helper()
	if opts.Logf == nil {
		opts.Logf = t.Logf
	}
	c, err := dockerhosts.New(n, opts)
	var missing *dockerhosts.MissingError
	if errors.As(err, &missing) {
		testenv.Missing(t, "%v", err)
	}
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(t.Failed()); err != nil {
			t.Error(err)
		}
	})
	return c
}

// ExecIn runs a program in the network namespace at path; see
// dockerhosts.ExecIn.
func ExecIn(path string, args ...string) (string, error) { return dockerhosts.ExecIn(path, args...) }

// DoIn runs fn in the network namespace at path; see dockerhosts.DoIn.
func DoIn(path string, fn func() error) error { return dockerhosts.DoIn(path, fn) }

// Leftovers lists what of run id still exists; see dockerhosts.Leftovers.
func Leftovers(id string) []string { return dockerhosts.Leftovers(id) }

// InstallManagedPlugin installs a managed plugin on h from dir; see
// dockerhosts.InstallManagedPlugin.
func InstallManagedPlugin(h *Host, dir, name string, settings ...string) (*ManagedPlugin, error) {
	return dockerhosts.InstallManagedPlugin(h, dir, name, settings...)
}

// ManagedPluginOf returns the managed plugin name that h has already; see
// dockerhosts.ManagedPluginOf.
func ManagedPluginOf(h *Host, name string) (*ManagedPlugin, error) {
	return dockerhosts.ManagedPluginOf(h, name)
}

// PluginBinary is $DNP_PLUGIN_BIN when set, else cmd/docker-net-plugin
// built once per test binary (RemovePluginBinary deletes it); it fails the
// test when neither works.
func PluginBinary(t testing.TB) string {
	t.Helper()
	bin, err := dockerhosts.PluginBinary()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// RemovePluginBinary deletes what PluginBinary built; call it from TestMain.
func RemovePluginBinary() { dockerhosts.RemovePluginBinary() }

// LegacyPlugin is the plugin running as a legacy plugin on one host (a
// dockerhosts.LegacyPlugin whose Start and Crash fail the test).
type LegacyPlugin struct{ *dockerhosts.LegacyPlugin }

// StartLegacyPlugin runs the plugin (PluginBinary) on h against storeURL
// and stops it in the cluster's teardown, after the containers are gone
// (so dockerd can still reach it). extra flags come last and so win over
// the defaults (--live-ttl 10s, --log-level debug). If the test failed the
// teardown logs the end of the plugin's log.
func StartLegacyPlugin(t testing.TB, c *Cluster, h *Host, storeURL string, extra ...string) *LegacyPlugin {
	t.Helper()
	p, err := c.StartLegacyPlugin(h, PluginBinary(t), storeURL, extra...)
	if err != nil {
		t.Fatal(err)
	}
	return &LegacyPlugin{p}
}

// Start runs the plugin again and waits until its socket answers.
func (p *LegacyPlugin) Start(t testing.TB) {
	t.Helper()
	if err := p.LegacyPlugin.Start(); err != nil {
		t.Fatal(err)
	}
}

// Crash kills the plugin at once (SIGKILL), as a crash would.
func (p *LegacyPlugin) Crash(t testing.TB) {
	t.Helper()
	if err := p.LegacyPlugin.Crash(); err != nil {
		t.Fatal(err)
	}
}
