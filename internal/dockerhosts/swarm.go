package dockerhosts

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// swarmPort is the swarm management port (docker swarm init's default).
const swarmPort = "2377"

// swarmTimeout bounds the wait for nodes to show up as ready.
const swarmTimeout = 60 * time.Second

// FormSwarm makes manager the only manager of a new swarm and joins the
// workers to it, all over the underlay: every node advertises and listens
// on its underlay address. It returns once the manager lists every node
// as ready. The cluster's teardown leaves the swarm on every host.
func (c *Cluster) FormSwarm(manager *Host, workers ...*Host) error {
	if _, err := manager.Docker("swarm", "init",
		"--advertise-addr", manager.UnderlayIP,
		"--listen-addr", manager.UnderlayIP+":"+swarmPort); err != nil {
		return fmt.Errorf("%s: %w", manager.Name, err)
	}
	token, err := manager.Docker("swarm", "join-token", "-q", "worker")
	if err != nil {
		return fmt.Errorf("%s: %w", manager.Name, err)
	}
	for _, w := range workers {
		if _, err := w.Docker("swarm", "join", "--token", token,
			"--advertise-addr", w.UnderlayIP,
			"--listen-addr", w.UnderlayIP+":"+swarmPort,
			manager.UnderlayIP+":"+swarmPort); err != nil {
			return fmt.Errorf("%s: %w", w.Name, err)
		}
	}
	want := []string{manager.Hostname}
	for _, w := range workers {
		want = append(want, w.Hostname)
	}
	slices.Sort(want)
	ctx, cancel := context.WithTimeout(context.Background(), swarmTimeout)
	defer cancel()
	for {
		out, err := manager.Docker("node", "ls", "--format", "{{.Hostname}} {{.Status}}")
		var ready []string
		for _, line := range strings.Split(out, "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[1] == "Ready" {
				ready = append(ready, f[0])
			}
		}
		slices.Sort(ready)
		if err == nil && slices.Equal(ready, want) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: swarm nodes ready: %v (%v); want %v", manager.Name, ready, err, want)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// NodePlugins returns, as the swarm manager h sees them, the plugins each
// node reports (docker node inspect: Description.Engine.Plugins), by node
// hostname, each as "Type=Name" such as "Network=dnp:latest". The
// scheduler places a task only on nodes that report its network's driver.
func (h *Host) NodePlugins() (map[string][]string, error) {
	ids, err := h.Docker("node", "ls", "-q")
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	args := append([]string{"node", "inspect", "--format",
		"{{.Description.Hostname}}{{range .Description.Engine.Plugins}} {{.Type}}={{.Name}}{{end}}"},
		strings.Fields(ids)...)
	out, err := h.Docker(args...)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", h.Name, err)
	}
	nodes := map[string][]string{}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) > 0 {
			nodes[f[0]] = f[1:]
		}
	}
	return nodes, nil
}
