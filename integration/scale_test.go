package integration

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestConcurrentContainers: three hosts start 100 containers each on one
// overlay at the same time. Every container gets its own address, every
// one reaches a container on another host, and removing them all leaves
// the store and the kernel empty.
func TestConcurrentContainers(t *testing.T) {
	if testing.Short() {
		t.Skip("300 containers: not in -short runs")
	}
	const perHost, parallel = 100, 6
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url, "--log-level", "info")
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", "10.60.0.0/22", "-o", "overlay=many", "many")
	}
	// One target per host, for the others to reach.
	targets := map[string]string{}
	for _, h := range c.Hosts {
		targets[h.Name] = runContainer(t, h, "target-"+h.Name, "many")
	}

	start := time.Now()
	type result struct{ host, name, ip string }
	results := make(chan result, 3*perHost)
	var wg sync.WaitGroup
	for _, h := range c.Hosts {
		sem := make(chan struct{}, parallel)
		for i := 0; i < perHost; i++ {
			wg.Add(1)
			go func(h *harness.Host, i int) {
				defer wg.Done()
				sem <- struct{}{}
				defer func() { <-sem }()
				name := fmt.Sprintf("c%03d", i)
				if _, err := h.Docker("run", "-d", "--init", "--name", name, "--network", "many", harness.Image, "sleep", "3600"); err != nil {
					t.Errorf("%s: run %s: %v", h.Name, name, err)
					return
				}
				ip, err := h.Docker("inspect", "-f", "{{.NetworkSettings.Networks.many.IPAddress}}", name)
				if err != nil {
					t.Errorf("%s: inspect %s: %v", h.Name, name, err)
					return
				}
				results <- result{h.Name, name, ip}
			}(h, i)
		}
	}
	wg.Wait()
	close(results)
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("%d containers started on %d hosts in %s", 3*perHost, len(c.Hosts), time.Since(start).Round(time.Millisecond))

	owner := map[string]string{}
	for _, ip := range targets {
		owner[ip] = "a target"
	}
	var all []result
	for r := range results {
		if prev, dup := owner[r.ip]; dup || r.ip == "" {
			t.Errorf("%s/%s got address %q, already held by %s", r.host, r.name, r.ip, prev)
		}
		owner[r.ip] = r.host + "/" + r.name
		all = append(all, r)
	}
	if len(all) != 3*perHost {
		t.Fatalf("%d containers reported, want %d", len(all), 3*perHost)
	}

	// Every container reaches the target of the next host.
	start = time.Now()
	byName := map[string]*harness.Host{}
	for _, h := range c.Hosts {
		byName[h.Name] = h
	}
	next := map[string]string{"h1": "h2", "h2": "h3", "h3": "h1"}
	sem := make(chan struct{}, 3*parallel)
	for _, r := range all {
		wg.Add(1)
		go func(r result) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			target := targets[next[r.host]]
			deadline := time.Now().Add(30 * time.Second)
			for {
				ok, out := ping(byName[r.host], r.name, target)
				if ok {
					return
				}
				if time.Now().After(deadline) {
					t.Errorf("%s/%s (%s) cannot reach %s on %s: %s", r.host, r.name, r.ip, target, next[r.host], out)
					return
				}
				time.Sleep(500 * time.Millisecond)
			}
		}(r)
	}
	wg.Wait()
	t.Logf("all %d containers reached a container on another host in %s", len(all), time.Since(start).Round(time.Millisecond))

	// Remove everything: the hosts at once, each host's containers one by one.
	for _, h := range c.Hosts {
		wg.Add(1)
		go func(h *harness.Host) {
			defer wg.Done()
			ids, err := h.Docker("ps", "-aq")
			if err != nil {
				t.Error(err)
				return
			}
			// One at a time on each host: dockerd 20.10 miscounts the
			// endpoints of a plugin's network when many of its containers
			// are removed concurrently (one `docker rm -f` naming 60 or
			// more), and then refuses `network rm` with "has active
			// endpoints" although every endpoint was deleted.
			for _, id := range strings.Fields(ids) {
				if _, err := h.Docker("rm", "-f", id); err != nil {
					t.Errorf("%s: rm: %v", h.Name, err)
				}
			}
			if err := networkRm(h, "many"); err != nil {
				inspect, _ := h.Docker("network", "inspect", "many")
				left, _ := h.Docker("ps", "-a")
				t.Errorf("%s: network rm: %v\nnetwork:\n%s\ncontainers:\n%s", h.Name, err, inspect, left)
			}
		}(h)
	}
	wg.Wait()
	for _, h := range c.Hosts {
		waitFor(t, 20*time.Second, h.Name+": overlay namespaces removed", func() bool { return len(overlayNamespaces(t, c, h)) == 0 })
	}
	if left := storeKeys(t, st); len(left) > 0 {
		t.Errorf("%d store keys left after removing everything, e.g. %v", len(left), left[:min(5, len(left))])
	}
}
