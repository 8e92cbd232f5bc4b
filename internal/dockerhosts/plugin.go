package dockerhosts

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// pluginTimeout bounds the wait for a managed plugin to be enabled or to
// come back after a restart.
const pluginTimeout = 60 * time.Second

// ManagedPlugin is a managed plugin (docker plugin create/enable) installed
// on one host. Its fields are read-only. The cluster's teardown disables and
// removes it (after the containers are gone).
type ManagedPlugin struct {
	Host   *Host
	Name   string // NAME:TAG, the -d and --ipam-driver value
	ID     string // dockerd's plugin ID
	Socket string // the plugin socket as this process sees it
}

// InstallManagedPlugin installs a managed plugin on h from dir, a plugin
// directory holding config.json and rootfs/ (scripts/build-plugin.sh makes
// one): docker plugin create name dir, docker plugin set with settings
// (KEY=VALUE for env, MOUNT.source=PATH for mounts), docker plugin enable.
// It returns once dockerd lists the plugin enabled and its socket answers.
func InstallManagedPlugin(h *Host, dir, name string, settings ...string) (*ManagedPlugin, error) {
	if !strings.Contains(name, ":") {
		return nil, fmt.Errorf("managed plugin name %q: want NAME:TAG", name)
	}
	for _, f := range []string{"config.json", "rootfs"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			return nil, fmt.Errorf("plugin directory %s: %w", dir, err)
		}
	}
	if _, err := h.Docker("plugin", "create", name, dir); err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	if len(settings) > 0 {
		if _, err := h.Docker(append([]string{"plugin", "set", name}, settings...)...); err != nil {
			return nil, fmt.Errorf("%s: %w", h.Name, err)
		}
	}
	p, err := findManagedPlugin(h, name)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), pluginTimeout)
	defer cancel()
	if _, err := h.DockerCtx(ctx, "plugin", "enable", name); err != nil {
		return p, fmt.Errorf("%s: %w; plugin log:\n%s", h.Name, err, p.Log(30))
	}
	if err := p.waitReady(ctx); err != nil {
		return p, err
	}
	return p, nil
}

// ManagedPluginOf returns the managed plugin name (NAME:TAG) that h has
// already, for example from docker plugin install, once it is enabled and
// answers on its socket.
func ManagedPluginOf(h *Host, name string) (*ManagedPlugin, error) {
	p, err := findManagedPlugin(h, name)
	if err != nil {
		return nil, err
	}
	return p, p.WaitReady()
}

func findManagedPlugin(h *Host, name string) (*ManagedPlugin, error) {
	info, err := h.Docker("plugin", "inspect", "--format", "{{.Id}} {{.Config.Interface.Socket}}", name)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	fields := strings.Fields(info)
	if len(fields) != 2 {
		return nil, fmt.Errorf("%s: plugin inspect %s: unexpected %q", h.Name, name, info)
	}
	// dockerd keeps a managed plugin's socket in /run/docker/plugins/<id>/
	// (not under --exec-root), which is the host's PluginDir in dockerd's
	// mount namespace.
	return &ManagedPlugin{Host: h, Name: name, ID: fields[0], Socket: filepath.Join(h.PluginDir, fields[0], fields[1])}, nil
}

// WaitReady waits until the plugin is enabled and answers on its socket,
// for example after docker plugin enable.
func (p *ManagedPlugin) WaitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), pluginTimeout)
	defer cancel()
	return p.waitReady(ctx)
}

// Enabled reports whether dockerd lists the plugin as enabled.
func (p *ManagedPlugin) Enabled() (bool, error) {
	out, err := p.Host.Docker("plugin", "inspect", "--format", "{{.Enabled}}", p.ID)
	if err != nil {
		return false, err
	}
	return out == "true", nil
}

// waitReady waits until the plugin is listed enabled and its socket accepts
// connections.
func (p *ManagedPlugin) waitReady(ctx context.Context) error {
	var last error
	for {
		enabled, err := p.Enabled()
		switch {
		case err != nil:
			last = err
		case !enabled:
			last = fmt.Errorf("not enabled")
		default:
			c, err := net.DialTimeout("unix", p.Socket, time.Second)
			if err == nil {
				c.Close()
				return nil
			}
			last = err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: plugin %s not ready: %v; plugin log:\n%s", p.Host.Name, p.Name, last, p.Log(30))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// PID returns the process ID of the plugin's process (as this process
// sees it): the child of the containerd shim that runs the plugin.
func (p *ManagedPlugin) PID() (int, error) {
	shims := procsWith(func(cmdline string) bool {
		return strings.Contains(cmdline, "containerd-shim") && strings.Contains(cmdline, p.ID) &&
			strings.Contains(cmdline, filepath.Join(p.Host.Dir, "exec")+"/")
	})
	for _, shim := range shims {
		for _, child := range childrenOf(shim) {
			return child, nil
		}
	}
	return 0, fmt.Errorf("%s: no process of plugin %s (shims %v)", p.Host.Name, p.Name, shims)
}

// Kill sends SIGKILL to the plugin's process, as a crash would, and returns
// the PID it killed. dockerd starts the plugin again at once; wait for that
// with WaitRestarted.
func (p *ManagedPlugin) Kill() (int, error) {
	pid, err := p.PID()
	if err != nil {
		return 0, err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return 0, fmt.Errorf("kill plugin %s (pid %d): %w", p.Name, pid, err)
	}
	return pid, nil
}

// WaitRestarted waits until a plugin process other than old runs and the
// plugin answers on its socket again; it returns the new PID.
func (p *ManagedPlugin) WaitRestarted(old int) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), pluginTimeout)
	defer cancel()
	for {
		pid, err := p.PID()
		if err == nil && pid != old {
			if err := p.waitReady(ctx); err != nil {
				return 0, err
			}
			return pid, nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("%s: plugin %s did not come back after pid %d ended (%v); plugin log:\n%s",
				p.Host.Name, p.Name, old, err, p.Log(30))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// PropagatedDir is the host-side directory of the plugin's propagated
// mount (config.json "propagatedMount"). What the plugin mounts there is
// visible only in dockerd's mount namespace: look through DockerdPath.
func (p *ManagedPlugin) PropagatedDir() string {
	return filepath.Join(p.Host.Dir, "data", "plugins", p.ID, "propagated-mount")
}

// Log returns the last n lines of dockerd's log that carry the plugin's
// output (dockerd logs a managed plugin's stdout and stderr with plugin=<id>).
func (p *ManagedPlugin) Log(n int) string {
	b, err := os.ReadFile(p.Host.LogFile)
	if err != nil {
		return err.Error()
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if p.ID != "" && strings.Contains(l, p.ID) {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// DockerdPID returns the PID of the host's running dockerd.
func (h *Host) DockerdPID() (int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cmd == nil {
		return 0, fmt.Errorf("dockerd of %s is not running", h.Name)
	}
	// nsenter, unshare and sh all exec: the started process is dockerd.
	return h.cmd.Process.Pid, nil
}

// DockerdPath returns where this process finds path as the host's
// dockerd sees it (through /proc/<dockerd>/root): for what only dockerd's
// mount namespace holds, such as the namespaces a managed plugin binds in
// its propagated mount.
func (h *Host) DockerdPath(path string) (string, error) {
	pid, err := h.DockerdPID()
	if err != nil {
		return "", err
	}
	return filepath.Join("/proc", strconv.Itoa(pid), "root", path), nil
}

// procsWith lists the PIDs of live processes whose command line matches.
func procsWith(match func(cmdline string) bool) []int {
	var pids []int
	for _, name := range dirNames("/proc") {
		pid, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + name + "/cmdline")
		if err != nil || len(b) == 0 {
			continue
		}
		if match(strings.ReplaceAll(string(b), "\x00", " ")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// childrenOf lists the live children of pid.
func childrenOf(pid int) []int {
	var kids []int
	for _, name := range dirNames("/proc") {
		child, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + name + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so cut at the last ')'.
		s := string(b)
		fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) && fields[0] != "Z" {
			kids = append(kids, child)
		}
	}
	return kids
}
