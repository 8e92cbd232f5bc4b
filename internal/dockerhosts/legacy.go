package dockerhosts

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// PluginName is the name a legacy plugin gets on every host: the value of
// -d and --ipam-driver.
const PluginName = "dnp"

// PluginBinEnv names a prebuilt plugin binary for PluginBinary to use.
const PluginBinEnv = "DNP_PLUGIN_BIN"

var (
	pluginBuild    sync.Once
	pluginBin      string
	pluginBuildErr error
)

// PluginBinary is $DNP_PLUGIN_BIN when set, else cmd/docker-net-plugin
// built once per process (RemovePluginBinary deletes it).
func PluginBinary() (string, error) {
	if p := os.Getenv(PluginBinEnv); p != "" {
		abs, err := filepath.Abs(p)
		if err == nil {
			_, err = os.Stat(abs)
		}
		if err != nil {
			return "", fmt.Errorf("%s=%s: %w", PluginBinEnv, p, err)
		}
		return abs, nil
	}
	pluginBuild.Do(func() {
		dir, err := os.MkdirTemp("", "dnp-bin-")
		if err != nil {
			pluginBuildErr = err
			return
		}
		_, here, _, _ := runtime.Caller(0) // internal/dockerhosts/legacy.go
		src := filepath.Join(filepath.Dir(here), "..", "..", "cmd", "docker-net-plugin")
		pluginBin = filepath.Join(dir, "docker-net-plugin")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-o", pluginBin, ".")
		cmd.Dir = src
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			pluginBuildErr = fmt.Errorf("go build %s: %v\n%s", src, err, out)
		}
	})
	return pluginBin, pluginBuildErr
}

// RemovePluginBinary deletes what PluginBinary built; call it at the end
// (TestMain).
func RemovePluginBinary() {
	if pluginBin != "" {
		os.RemoveAll(filepath.Dir(pluginBin))
	}
}

// LegacyPlugin is `docker-net-plugin serve` running as a legacy plugin in
// one host's network namespace, its socket in the host's plugin directory.
type LegacyPlugin struct {
	Host *Host
	Log  string // its log file

	bin  string
	args []string
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// StartLegacyPlugin runs the plugin binary bin (see PluginBinary) on h
// against storeURL and stops it in Close, after the containers are gone
// (so dockerd can still reach it). extra flags come last and so win over
// the defaults (--live-ttl 10s, --log-level debug). If Close is told the
// run failed, it shows the end of the plugin's log (Options.Logf).
func (c *Cluster) StartLegacyPlugin(h *Host, bin, storeURL string, extra ...string) (*LegacyPlugin, error) {
	p := &LegacyPlugin{Host: h, Log: filepath.Join(h.Dir, "plugin.log"), bin: bin}
	p.args = append([]string{"serve",
		"--store", storeURL,
		"--name", PluginName,
		"--socket", p.socket(),
		"--advertise-addr", h.UnderlayIP,
		"--netns-prefix", c.Prefix + "-" + h.Name + "-",
		"--live-ttl", "10s",
		"--docker-host", "unix://" + h.DockerSock,
		"--names-cache", filepath.Join(h.Dir, "names-cache.json"),
		"--log-level", "debug",
		// The host's own machine id, key and encryption data path socket.
		"--state-dir", filepath.Join(h.Dir, "state"),
	}, extra...)
	if err := p.Start(); err != nil {
		return nil, err
	}
	c.Cleanup(func() {
		p.Stop()
		// The lock file the plugin and doctor --fix share (overlay.Host.LockPath).
		os.Remove(filepath.Join("/run", "."+c.Prefix+"-"+h.Name+"-lock"))
		if c.closingFailed() {
			out, _ := os.ReadFile(p.Log)
			if len(out) > 6000 {
				out = out[len(out)-6000:]
			}
			c.logf("plugin log of %s (end):\n%s", h.Name, out)
		}
	})
	return p, nil
}

func (p *LegacyPlugin) socket() string { return filepath.Join(p.Host.PluginDir, PluginName+".sock") }

// Start runs the plugin (again) and waits until its socket answers.
func (p *LegacyPlugin) Start() error {
	lf, err := os.OpenFile(p.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	p.cmd = p.Host.Command(p.bin, p.args...)
	p.cmd.Stdout, p.cmd.Stderr = lf, lf
	if err := p.cmd.Start(); err != nil {
		lf.Close()
		return fmt.Errorf("start the plugin on %s: %w", p.Host.Name, err)
	}
	done := make(chan struct{})
	p.done = done
	go func() { p.cmd.Wait(); lf.Close(); close(done) }()
	deadline := time.Now().Add(15 * time.Second)
	for {
		if conn, err := net.Dial("unix", p.socket()); err == nil {
			conn.Close()
			return nil
		}
		select {
		case <-done:
			out, _ := os.ReadFile(p.Log)
			return fmt.Errorf("plugin on %s exited at start:\n%s", p.Host.Name, out)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("plugin socket %s not there after 15s", p.socket())
		}
	}
}

// Stop ends the plugin with SIGTERM (SIGKILL after 10 s); a stopped
// plugin is left alone.
func (p *LegacyPlugin) Stop() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
}

// Crash kills the plugin at once (SIGKILL), as a crash would.
func (p *LegacyPlugin) Crash() error {
	if err := p.cmd.Process.Kill(); err != nil {
		return fmt.Errorf("kill the plugin on %s: %w", p.Host.Name, err)
	}
	<-p.done
	return nil
}

// Pid is the plugin's process id (nsenter execs the plugin in place).
func (p *LegacyPlugin) Pid() int { return p.cmd.Process.Pid }
