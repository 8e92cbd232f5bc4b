package integration

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestSwarm runs the plugin in swarm mode, as the README's Swarm section
// shows: three Docker hosts form a swarm (one manager, two workers) over
// the underlay, each with the managed plugin in global scope on one etcd.
// A network created on the manager carries a global service with a task on
// every node: every task reaches every other one across hosts, with the
// user's -o mtu, also after the manager's dockerd restarted (swarm then
// requests all its allocations again); a container started with docker
// run on a worker joins the attachable network too. A fourth, plain Docker host uses the same store
// for a network of its own alongside, and cannot take over the swarm
// network's subnet. Removing the service and the networks leaves no kernel
// state, iptables rule or store key behind.
func TestSwarm(t *testing.T) {
	const (
		swarmNet    = "swarmnet"
		swarmSubnet = "10.60.0.0/24"
		plainNet    = "plainnet"
		plainSubnet = "10.70.0.0/24"
		service     = "pinger"
	)
	// daemon.json names the plugin's name server as docs/names.md says:
	// swarm networks keep Docker's own name resolution.
	c := harness.New(t, 4, harness.Options{DNS: namesDNS})
	stubResolver(t, c)
	url, st := kvServer(t, c, "etcd")
	nodes, plainHost := c.Hosts[:3], c.Hosts[3]
	mgr, workers := nodes[0], nodes[1:]

	// The managed plugin on every host, in global scope on the swarm nodes;
	// then the swarm, over the underlay.
	plugins := map[string]*harness.ManagedPlugin{}
	for _, h := range nodes {
		plugins[h.Name] = installManaged(t, c, h, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP, "DNP_SCOPE=global")
	}
	plugins[plainHost.Name] = installManaged(t, c, plainHost, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+plainHost.UnderlayIP)
	start := time.Now()
	if err := c.FormSwarm(mgr, workers...); err != nil {
		t.Fatal(err)
	}
	// The scheduler places tasks only on nodes that report the plugin.
	waitFor(t, 60*time.Second, "every swarm node lists the plugin", func() bool {
		listed, err := mgr.NodePlugins()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, h := range nodes {
			if slices.Contains(listed[h.Hostname], "Network="+managedName) {
				n++
			}
		}
		return n == len(nodes)
	})
	t.Logf("swarm of %d nodes formed, every node lists %s, in %s", len(nodes), managedName, time.Since(start).Round(time.Millisecond))

	// A swarm network and a global service with a task on every node.
	mgr.MustDocker(t, "network", "create", "-d", managedName, "--ipam-driver", managedName, "--attachable",
		"--subnet", swarmSubnet, "-o", "mtu=1400", swarmNet)
	mgr.MustDocker(t, "service", "create", "--detach", "--name", service, "--mode", "global", "--init",
		"--no-resolve-image", "--network", swarmNet, harness.Image, "sleep", "3600")
	subnet := netip.MustParsePrefix(swarmSubnet)
	// runningTasks waits for the service's task on every node and returns
	// their container ids and addresses by host name.
	runningTasks := func() (tasks, ips map[string]string) {
		tasks, ips = map[string]string{}, map[string]string{}
		for _, h := range nodes {
			waitFor(t, 90*time.Second, h.Name+": the service's task runs with an address on "+swarmNet, func() bool {
				id, _ := h.Docker("ps", "-q", "--filter", "label=com.docker.swarm.service.name="+service)
				if id == "" || strings.Contains(id, "\n") {
					return false
				}
				ip, _ := h.Docker("inspect", "-f", `{{(index .NetworkSettings.Networks "`+swarmNet+`").IPAddress}}`, id)
				if a, err := netip.ParseAddr(ip); err != nil || !subnet.Contains(a) {
					return false
				}
				tasks[h.Name], ips[h.Name] = id, ip
				return true
			})
		}
		if len(uniq(values(ips))) != len(nodes) {
			t.Fatalf("tasks on different nodes got the same address: %v", ips)
		}
		for _, h := range nodes {
			// The user's -o option reached CreateNetwork on every node.
			if mtu := h.MustDocker(t, "exec", tasks[h.Name], "cat", "/sys/class/net/eth0/mtu"); mtu != "1400" {
				t.Errorf("%s: task MTU %s, want 1400 (-o mtu=1400)", h.Name, mtu)
			}
		}
		for _, from := range nodes {
			for _, to := range nodes {
				if from != to {
					pingEventually(t, from, tasks[from.Name], ips[to.Name])
				}
			}
		}
		return tasks, ips
	}
	tasks, ips := runningTasks()
	t.Logf("%s: every task pings every other task across hosts: %v (%s after swarm init)", service, ips, time.Since(start).Round(time.Millisecond))
	swarmNames(t, mgr, tasks[mgr.Name], service, values(ips))
	// The network's options show what AllocateNetwork returned on the
	// manager, and every node's CreateNetwork got: the user's options with
	// the overlay's name and VNI.
	opts := mgr.MustDocker(t, "network", "inspect", "-f", "{{json .Options}}", swarmNet)
	for _, want := range []string{`"mtu":"1400"`, `"overlay":"net-10-60-0-0-24"`, `"vni":"`} {
		if !strings.Contains(opts, want) {
			t.Errorf("%s options %s: want %s", swarmNet, opts, want)
		}
	}

	// The manager restarts: swarm requests the network's allocations again.
	// Its own task is replaced, and the service keeps working.
	restart := time.Now()
	if err := mgr.StopDockerd(); err != nil {
		t.Fatal(err)
	}
	if err := mgr.StartDockerd(); err != nil {
		t.Fatal(err)
	}
	tasks, ips = runningTasks()
	t.Logf("after the manager's dockerd restarted: every task pings every other task again: %v (%s)", ips, time.Since(restart).Round(time.Millisecond))

	// docker run on a worker joins the attachable network.
	w := workers[1]
	attached := runContainer(t, w, "attached", swarmNet)
	if slices.Contains(values(ips), attached) {
		t.Fatalf("docker run on %s got %s, the address of a task: %v", w.Name, attached, ips)
	}
	pingEventually(t, w, "attached", ips[workers[0].Name])
	pingEventually(t, mgr, tasks[mgr.Name], attached)
	t.Logf("docker run on %s: %s reaches the tasks on other hosts", w.Name, attached)
	// Docker's name gossip: the worker that did not restart resolves the
	// container attached on the other worker.
	d := dnsOf(t, workers[0], tasks[workers[0].Name])
	d.want(t, 20*time.Second, "a container attached on another node", "attached", dns.TypeA, attached)

	// A plain host's network on the same store, side by side; the swarm
	// network's subnet is not for it.
	plainHost.MustDocker(t, "network", "create", "-d", managedName, "--ipam-driver", managedName, "--subnet", plainSubnet, plainNet)
	a := runContainer(t, plainHost, "plain-a", plainNet)
	b := runContainer(t, plainHost, "plain-b", plainNet)
	pingEventually(t, plainHost, "plain-a", b)
	out, err := plainHost.Docker("network", "create", "-d", managedName, "--ipam-driver", managedName, "--subnet", swarmSubnet, "clash")
	if err == nil || !strings.Contains(err.Error(), "belongs to swarm network") {
		t.Errorf("plain network on the swarm network's subnet: %q, %v; want it refused", out, err)
	}
	t.Logf("plain host %s: %s (%s, %s) next to %s on one store", plainHost.Name, plainNet, a, b, swarmNet)

	// Everything goes; nothing stays.
	removal := time.Now()
	w.MustDocker(t, "rm", "-f", "attached")
	mgr.MustDocker(t, "service", "rm", service)
	for _, h := range nodes {
		waitFor(t, 60*time.Second, h.Name+": the service's task is gone", func() bool {
			return h.MustDocker(t, "ps", "-aq", "--filter", "label=com.docker.swarm.service.name="+service) == ""
		})
	}
	t.Logf("service removed in %s", time.Since(removal).Round(time.Millisecond))
	mgr.MustDocker(t, "network", "rm", swarmNet)
	plainHost.MustDocker(t, "rm", "-f", "plain-a", "plain-b")
	plainHost.MustDocker(t, "network", "rm", plainNet)
	for _, h := range nodes {
		waitFor(t, 30*time.Second, h.Name+": "+swarmNet+" is gone", func() bool {
			return h.MustDocker(t, "network", "ls", "-q", "--filter", "name="+swarmNet) == ""
		})
	}
	t.Logf("networks removed from every host %s after removal started", time.Since(removal).Round(time.Millisecond))
	for _, h := range c.Hosts {
		waitFor(t, 15*time.Second, h.Name+": overlay namespaces removed", func() bool {
			return len(overlayNS(t, plugins[h.Name])) == 0
		})
		assertNoPluginLeftovers(t, h, "10.60.0", "10.70.0")
	}
	var left []string
	deadline := time.Now().Add(15 * time.Second)
	for left = storeKeys(t, st); len(left) > 0 && time.Now().Before(deadline); left = storeKeys(t, st) {
		time.Sleep(200 * time.Millisecond)
	}
	if len(left) > 0 {
		t.Errorf("store keys left after everything was removed: %v", left)
	}
}

// swarmNames checks, from a task on h, the names Docker itself gives swarm
// networks (the daemons' "dns" setting names the plugin's name server
// too): the service name (its virtual IP), tasks.<service> (every task),
// and the outside world.
func swarmNames(t *testing.T, h *harness.Host, task, service string, taskIPs []string) {
	t.Helper()
	d := dnsOf(t, h, task)
	d.want(t, 20*time.Second, "tasks.<service>", "tasks."+service, dns.TypeA, taskIPs...)
	vip, err := d.lookup(service, dns.TypeA)
	if err != nil || len(vip) != 1 || slices.Contains(taskIPs, vip[0]) {
		t.Errorf("%s resolves to %v (%v), want one virtual IP, not a task's %v", service, vip, err, taskIPs)
	}
	d.want(t, 0, "the outside world", outsideName, dns.TypeA, outsideAddr)
	t.Logf("swarm names from a task on %s: %s -> %v, tasks.%s -> %v", h.Name, service, vip, service, taskIPs)
}
