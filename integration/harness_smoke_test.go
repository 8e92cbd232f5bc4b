package integration

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// TestSmokeHarness brings up a 2-host cluster, uses each dockerd, checks the
// underlay and the per-host plugin directory, and after teardown checks that
// nothing of the run is left on the machine.
func TestSmokeHarness(t *testing.T) {
	testenv.NeedRoot(t)
	rootRulesBefore := smokeDockerRules(t, "")

	var id string
	t.Run("cluster", func(t *testing.T) {
		start := time.Now()
		c := harness.New(t, 2, harness.Options{})
		t.Logf("2-host cluster %s ready in %s", c.Prefix, time.Since(start).Round(time.Millisecond))
		id = c.ID
		h1, h2 := c.Hosts[0], c.Hosts[1]

		engineIDs := map[string]string{}
		for _, h := range c.Hosts {
			info := h.MustDocker(t, "info", "--format", "{{.ID}} {{.Name}} {{.ServerVersion}}")
			fields := strings.Fields(info)
			if len(fields) != 3 || fields[1] != h.Hostname {
				t.Fatalf("%s: docker info = %q; want ID, hostname %s and version", h.Name, info, h.Hostname)
			}
			if other, dup := engineIDs[fields[0]]; dup {
				t.Errorf("%s and %s share engine ID %s", other, h.Name, fields[0])
			}
			engineIDs[fields[0]] = h.Name

			h.MustDocker(t, "run", "--rm", "--init", "--network", "none", harness.Image, "true")
			out := h.MustDocker(t, "run", "--rm", "--init", "--network", "none", harness.Image,
				"sh", "-c", "ls /sys/class/net; echo hello from $(hostname)")
			if !strings.Contains(out, "hello from") || strings.Fields(out)[0] != "lo" {
				t.Errorf("%s: container output %q; want only lo and a greeting", h.Name, out)
			}

			// dockerd sees the host's devices in /sys, not the machine's.
			pid, err := os.ReadFile(filepath.Join(h.Dir, "docker.pid"))
			if err != nil {
				t.Fatal(err)
			}
			sysNet, err := exec.Command("nsenter", "--target", strings.TrimSpace(string(pid)), "--mount",
				"ls", "/sys/class/net").CombinedOutput()
			if got := strings.Fields(string(sysNet)); err != nil || !slices.Equal(got, []string{"lo", h.UnderlayDev}) {
				t.Errorf("%s: dockerd's /sys/class/net = %q, %v; want lo and %s", h.Name, sysNet, err, h.UnderlayDev)
			}

			// dockerd's firewall rules live in the host's namespace.
			if rules := smokeDockerRules(t, h.NetNS); len(rules) == 0 {
				t.Errorf("%s: no DOCKER iptables rules in the host namespace", h.Name)
			}
		}

		if out, err := h1.Exec("busybox", "ping", "-c", "1", "-W", "2", h2.UnderlayIP); err != nil {
			t.Errorf("ping h1 -> h2 underlay: %v", err)
		} else {
			t.Logf("h1 -> h2: %s", out[strings.LastIndex(out, "\n")+1:])
		}
		if _, err := h2.Exec("busybox", "ping", "-c", "1", "-W", "2", c.SwitchIP); err != nil {
			t.Errorf("ping h2 -> switch: %v", err)
		}
		// The switch address is also reachable off-link, via the default route.
		if out, err := h1.Exec("ip", "route", "get", "192.168.251.1"); err != nil || !strings.Contains(out, "via "+c.SwitchIP) {
			t.Errorf("h1 default route: %q, %v; want via %s", out, err, c.SwitchIP)
		}

		var names []string
		err := h1.Do(func() error {
			ifs, err := net.Interfaces()
			for _, i := range ifs {
				names = append(names, i.Name)
			}
			return err
		})
		if err != nil || !slices.Contains(names, h1.UnderlayDev) {
			t.Errorf("h1.Do: interfaces %v, %v; want %s", names, err, h1.UnderlayDev)
		}

		smokeCheckPluginDir(t, h1, h2)
	})

	if id == "" {
		t.Fatal("cluster did not start")
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	if strings.Contains(string(out), id) {
		t.Errorf("namespaces of run %s left:\n%s", id, out)
	}
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), id) {
		t.Errorf("mounts of run %s left in the root mount namespace", id)
	}
	if left := harness.Leftovers(id); len(left) > 0 {
		t.Errorf("run %s left: %v", id, left)
	}
	if after := smokeDockerRules(t, ""); strings.Join(after, "\n") != strings.Join(rootRulesBefore, "\n") {
		t.Errorf("DOCKER iptables rules of the root namespace changed:\nbefore %v\nafter  %v", rootRulesBefore, after)
	}
}

// checkPluginDir puts a minimal legacy network plugin into h1's plugin
// directory: h1's dockerd must use it, h2's must not see it.
func smokeCheckPluginDir(t *testing.T, h1, h2 *harness.Host) {
	const name = "dnptprobe"
	sock := filepath.Join(h1.PluginDir, name+".sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var calls []string
	answers := map[string]any{
		"/Plugin.Activate":                           map[string]any{"Implements": []string{"NetworkDriver"}},
		"/NetworkDriver.GetCapabilities":             map[string]any{"Scope": "local"},
		"/NetworkDriver.CreateNetwork":               map[string]any{},
		"/NetworkDriver.DeleteNetwork":               map[string]any{},
		"/NetworkDriver.DiscoverNew":                 map[string]any{},
		"/NetworkDriver.DiscoverDelete":              map[string]any{},
		"/NetworkDriver.ProgramExternalConnectivity": map[string]any{},
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		calls = append(calls, r.URL.Path)
		mu.Unlock()
		w.Header().Set("Content-Type", "application/vnd.docker.plugins.v1+json")
		answer, ok := answers[r.URL.Path]
		if !ok {
			w.WriteHeader(http.StatusNotFound)
			answer = map[string]string{"Err": "not implemented by the probe"}
		}
		json.NewEncoder(w).Encode(answer)
	})}
	go srv.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})

	h1.MustDocker(t, "network", "create", "-d", name, "probenet")
	h1.MustDocker(t, "network", "rm", "probenet")
	mu.Lock()
	got := strings.Join(calls, " ")
	mu.Unlock()
	if !strings.Contains(got, "/Plugin.Activate") || !strings.Contains(got, "/NetworkDriver.CreateNetwork") {
		t.Errorf("h1 plugin calls: %s; want Activate and CreateNetwork", got)
	}

	// What each dockerd sees as /run/docker/plugins.
	for _, h := range []*harness.Host{h1, h2} {
		pid, err := os.ReadFile(filepath.Join(h.Dir, "docker.pid"))
		if err != nil {
			t.Fatal(err)
		}
		ls, err := exec.Command("nsenter", "--target", strings.TrimSpace(string(pid)), "--mount", "ls", "/run/docker/plugins").CombinedOutput()
		if err != nil {
			t.Fatalf("%s: ls /run/docker/plugins: %v: %s", h.Name, err, ls)
		}
		if want := h == h1; strings.Contains(string(ls), name+".sock") != want {
			t.Errorf("%s sees /run/docker/plugins = %q; probe socket expected: %v", h.Name, ls, want)
		}
	}
}

// dockerRules returns the iptables -S lines naming DOCKER in the namespace at
// netns ("" = the test's own).
func smokeDockerRules(t *testing.T, netns string) []string {
	t.Helper()
	args := []string{"iptables", "-S"}
	if netns != "" {
		args = append([]string{"nsenter", "--net=" + netns, "--"}, args...)
	}
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		testenv.Missing(t, "iptables -S: %v: %s", err, out)
	}
	var rules []string
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "DOCKER") {
			rules = append(rules, line)
		}
	}
	return rules
}
