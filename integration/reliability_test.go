package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// The figures these tests assert; the README's reliability section quotes
// them.
const (
	// relFailFast: with the store down, a docker command that needs it
	// fails within this, with an error naming the store.
	relFailFast = 8 * time.Second
	// relAnswerWithin: meanwhile dockerd answers everything else within this.
	relAnswerWithin = 5 * time.Second
	// relOutage is how long the store is stopped.
	relOutage = 30 * time.Second
	// relConverge bounds how long after the store (or the plugin) is back
	// new containers work again.
	relConverge = 20 * time.Second
	// relSubnet is the overlay the tests use.
	relSubnet = "10.70.0.0/24"
)

var relStores = []string{"etcd", "consul", "zk"}

// TestReliabilityPluginRestart: kill -9 the plugin of a host while a
// container there pings a container on another host every 100 ms. No ping
// is lost: the kernel keeps forwarding without the plugin, the other host
// keeps this host's entries (the live key is taken over by the restarted
// plugin, never deleted), and the restarted plugin touches nothing that is
// right. What changed while it was down (a remote container removed,
// another started) is applied on start, and new containers work.
func TestReliabilityPluginRestart(t *testing.T) {
	for _, kind := range relStores {
		t.Run(kind, func(t *testing.T) { testPluginRestart(t, kind) })
	}
}

func testPluginRestart(t *testing.T, kind string) {
	c := harness.New(t, 2, harness.Options{})
	url, st := kvServer(t, c, kind)
	relRemoveContainersFirst(t, c)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	p1 := startPlugin(t, c, h1, url)
	startPlugin(t, c, h2, url)
	for _, h := range c.Hosts {
		relNetCreate(t, h)
	}
	a1 := runContainer(t, h1, "a1", "blue")
	b2 := runContainer(t, h2, "b2", "blue")
	gone2 := runContainer(t, h2, "gone2", "blue")
	pingEventually(t, h1, "a1", b2)
	pingEventually(t, h1, "a1", gone2)
	pingEventually(t, h2, "b2", a1)

	ns := relOverlayNS(t, c, h1)
	before := readOverlay(t, h1, ns)
	macB2 := relMAC(t, h2, "b2")
	macGone := relMAC(t, h2, "gone2")
	if _, ok := before.fdb[macB2]; !ok {
		t.Fatalf("h1 has no forwarding entry for b2 (%s) before the test: %v", macB2, before.fdb)
	}

	// Long enough for the killed plugin's live key to expire (10 s TTL;
	// Consul sessions up to twice that) while the ping still runs.
	const pings = 250
	lost := watchHostKey(t, st, h1.UnderlayIP)
	ping := startPingRun(h1, "a1", b2, pings)
	time.Sleep(time.Second)

	killed := time.Now()
	p1.Crash(t)
	// While h1's plugin is down, h2 removes a container and starts another:
	// h1's kernel keeps a stale entry and lacks a new one.
	h2.MustDocker(t, "rm", "-f", "gone2")
	late2 := runContainer(t, h2, "late2", "blue")
	macLate := relMAC(t, h2, "late2")
	if d := 3*time.Second - time.Since(killed); d > 0 {
		time.Sleep(d)
	}
	p1.Start(t)
	restarted := time.Now()
	t.Logf("h1's plugin was down for %s", restarted.Sub(killed).Round(time.Millisecond))

	waitFor(t, relConverge, "h1's kernel gains late2 and drops gone2", func() bool {
		f := readOverlay(t, h1, ns).fdb
		_, hasLate := f[macLate]
		_, hasGone := f[macGone]
		return hasLate && !hasGone
	})
	t.Logf("h1 reconciled %s after its plugin started", time.Since(restarted).Round(time.Millisecond))

	// Nothing that was right was rebuilt or rewritten.
	after := readOverlay(t, h1, ns)
	if after.inode != before.inode {
		t.Errorf("h1's overlay namespace was recreated (inode %d, was %d)", after.inode, before.inode)
	}
	for _, dev := range []string{"br0", "vxlan0"} {
		if after.links[dev] != before.links[dev] {
			t.Errorf("h1's %s was recreated (ifindex %d, was %d)", dev, after.links[dev], before.links[dev])
		}
	}
	if age, ok := after.fdb[macB2]; !ok {
		t.Errorf("h1 lost its forwarding entry for b2 (%s)", macB2)
	} else if untouched := time.Since(killed) - time.Second; age < untouched {
		t.Errorf("h1's forwarding entry for b2 was rewritten after the restart: last updated %s ago, the plugin was killed %s ago",
			age, time.Since(killed).Round(time.Second))
	}

	sent, received := ping.wait(t)
	t.Logf("a1 -> b2 across the kill -9 and restart: %d sent, %d received", sent, received)
	if sent != pings || received != sent {
		t.Errorf("lost %d of %d pings while h1's plugin was killed and restarted:\n%s", sent-received, sent, ping.out)
	}
	if why := lost(); why != "" {
		t.Errorf("the other hosts saw h1's live key go away during the restart: %s", why)
	}

	// New containers work, both ways, with the old and the new peers.
	n1 := runContainer(t, h1, "new1", "blue")
	pingEventually(t, h1, "new1", b2)
	pingEventually(t, h1, "new1", late2)
	pingEventually(t, h1, "a1", late2)
	pingEventually(t, h2, "late2", n1)
	relCheckHosts(t, c, st, c.Hosts...)
}

// TestReliabilityDockerdRestart: dockerd restarts, then the host "reboots"
// (everything of it is killed and the plugin's kernel objects deleted).
// Each time the network and the --restart always containers come back,
// reach the other host, and the host has exactly one namespace, bridge
// and VXLAN device for its overlay, one port per container, and no stale
// store record or address.
func TestReliabilityDockerdRestart(t *testing.T) {
	c := harness.New(t, 2, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	p1 := startPlugin(t, c, h1, url)
	startPlugin(t, c, h2, url)
	for _, h := range c.Hosts {
		relNetCreate(t, h)
	}
	for _, name := range []string{"a1", "x1"} {
		runContainer(t, h1, name, "blue", "--restart", "always")
	}
	b2 := runContainer(t, h2, "b2", "blue")
	pingEventually(t, h1, "a1", b2)
	relCheckHosts(t, c, st, c.Hosts...)
	addrs := len(relKeys(t, st, ipam.AddrsDir))

	comeBack := func(what string) {
		t.Helper()
		waitFor(t, relConverge, what+": a1 and x1 running again", func() bool {
			out, _ := h1.Docker("inspect", "-f", "{{.State.Running}}", "a1", "x1")
			return out == "true\ntrue"
		})
		if out := h1.MustDocker(t, "network", "ls", "--filter", "name=^blue$", "-q"); out == "" {
			t.Fatalf("%s: network blue is gone from h1", what)
		}
		a1 := relIP(t, h1, "a1")
		pingEventually(t, h1, "a1", b2)
		pingEventually(t, h1, "x1", b2)
		pingEventually(t, h2, "b2", a1)
		relCheckHosts(t, c, st, c.Hosts...)
		if n := len(relKeys(t, st, ipam.AddrsDir)); n != addrs {
			t.Errorf("%s: %d addresses allocated in the store, %d before: %v", what, n, addrs, relKeys(t, st, ipam.AddrsDir))
		}
	}

	// dockerd restart: it stops the containers and starts them again.
	start := time.Now()
	if err := h1.StopDockerd(); err != nil {
		t.Fatal(err)
	}
	if err := h1.StartDockerd(); err != nil {
		t.Fatal(err)
	}
	comeBack("after a dockerd restart")
	t.Logf("dockerd restart: containers back and reachable in %s", time.Since(start).Round(time.Millisecond))

	// Reboot: every process of the host dies at once (plugin, dockerd,
	// containerd, shims, containers) and the plugin's kernel objects are
	// gone. Then, as at boot, the plugin starts, then dockerd.
	start = time.Now()
	relCrashHost(t, h1, p1)
	relWipeKernel(t, c, h1)
	p1.Start(t)
	if err := h1.StartDockerd(); err != nil {
		t.Fatal(err)
	}
	comeBack("after a simulated reboot")
	t.Logf("reboot: containers back and reachable in %s", time.Since(start).Round(time.Millisecond))
}

// TestReliabilityStoreOutage, on each store: the plugins start before
// their store exists (boot order), serve what they can and converge once
// it is there. Then the store stops for 30 s: containers keep talking
// across hosts without losing a ping, a plugin restarted meanwhile keeps
// its host's data plane, docker run on the overlay fails within seconds
// with an error naming the store while dockerd answers everything else,
// and once the store is back the plugins resume and new containers work.
// Last, one host alone is cut from the store for 6 s while the other
// changes things: once healed it catches up on what it missed.
func TestReliabilityStoreOutage(t *testing.T) {
	for _, kind := range relStores {
		t.Run(kind, func(t *testing.T) {
			t.Parallel() // most of each is waiting for the outage to end
			testStoreOutage(t, kind)
		})
	}
}

func testStoreOutage(t *testing.T, kind string) {
	c := harness.New(t, 2, harness.Options{})
	srv, url, st := kvServerProc(t, c, kind)
	relRemoveContainersFirst(t, c)
	h1, h2 := c.Hosts[0], c.Hosts[1]

	// Boot order: the store is not up yet when the plugins start.
	srv.Stop(t)
	startPlugin(t, c, h1, url)
	p2 := startPlugin(t, c, h2, url)
	took, err := relTimed(func() error { return relTryNetCreate(h1) })
	relWantStoreError(t, "network create before the store is up", took, err, srv.Addr)
	h1.Docker("network", "rm", "blue") // in case dockerd kept a half-made one
	relDockerdAnswers(t, h1)
	srv.Start(t)
	storeUp := time.Now()
	for _, h := range c.Hosts {
		relRetry(t, relConverge, h.Name+": network create once the store is up", func() error { return relTryNetCreate(h) })
	}
	a1 := runContainer(t, h1, "a1", "blue")
	b2 := runContainer(t, h2, "b2", "blue")
	pingEventually(t, h1, "a1", b2)
	pingEventually(t, h2, "b2", a1)
	t.Logf("boot order: store up %s ago, containers on both hosts reach each other", time.Since(storeUp).Round(time.Millisecond))

	// The outage. The ping runs from before the store stops until after
	// it is back, the plugins have registered again and the partition
	// below has healed.
	const pings = 600
	ping := startPingRun(h1, "a1", b2, pings)
	time.Sleep(time.Second)
	srv.Stop(t)
	stopped := time.Now()

	took, err = relTimed(func() error {
		_, err := h1.Docker("run", "-d", "--init", "--name", "during", "--network", "blue", harness.Image, "sleep", "3600")
		return err
	})
	relWantStoreError(t, "docker run during the outage", took, err, srv.Addr)
	h1.Docker("rm", "-f", "during")
	relDockerdAnswers(t, h1)

	// A plugin that starts while its store is down (a host rebooting
	// during the outage) keeps what the kernel has.
	p2.Crash(t)
	p2.Start(t)

	time.Sleep(time.Until(stopped.Add(relOutage)))
	srv.Start(t)
	back := time.Now()
	t.Logf("%s was down for %s", kind, back.Sub(stopped).Round(time.Millisecond))

	// New containers work again; h1 learns of c2 from its watch only.
	relRetry(t, relConverge, "docker run on h2 once the store is back", func() error {
		h2.Docker("rm", "-f", "c2")
		_, err := h2.Docker("run", "-d", "--init", "--name", "c2", "--network", "blue", harness.Image, "sleep", "3600")
		return err
	})
	t.Logf("docker run works again %s after the store came back", time.Since(back).Round(time.Millisecond))
	c2 := relIP(t, h2, "c2")
	pingEventually(t, h1, "a1", c2)
	c1 := runContainer(t, h1, "c1", "blue")
	pingEventually(t, h1, "c1", b2)
	pingEventually(t, h2, "c2", c1)

	// h1 alone loses the store for a few seconds (less than the live TTL)
	// while h2 removes c2 and starts late2; once the network heals, h1
	// catches up on what it missed.
	macC2 := relMAC(t, h2, "c2")
	relPartition(t, h1, srv.Addr, true)
	cut := time.Now()
	h2.MustDocker(t, "rm", "-f", "c2")
	late2 := runContainer(t, h2, "late2", "blue")
	macLate := relMAC(t, h2, "late2")
	time.Sleep(time.Until(cut.Add(6 * time.Second)))
	ns := relOverlayNS(t, c, h1)
	if _, ok := readOverlay(t, h1, ns).fdb[macLate]; ok {
		t.Fatal("h1 learnt of late2 while cut from the store: the partition did not work")
	}
	relPartition(t, h1, srv.Addr, false)
	healed := time.Now()
	waitFor(t, relConverge, "h1 gains late2 and drops c2 after the partition", func() bool {
		f := readOverlay(t, h1, ns).fdb
		_, hasLate := f[macLate]
		_, hasC2 := f[macC2]
		return hasLate && !hasC2
	})
	t.Logf("h1 caught up %s after its partition from the store healed", time.Since(healed).Round(time.Millisecond))
	pingEventually(t, h1, "a1", late2)

	sent, received := ping.wait(t)
	t.Logf("a1 -> b2 across the outage: %d sent, %d received", sent, received)
	if sent != pings || received != sent {
		t.Errorf("lost %d of %d pings across the store outage:\n%s", sent-received, sent, ping.out)
	}
	// The calls that failed left nothing behind.
	relCheckHosts(t, c, st, c.Hosts...)
}

// relNetCreate creates the overlay "blue" on h.
func relNetCreate(t *testing.T, h *harness.Host) {
	t.Helper()
	if err := relTryNetCreate(h); err != nil {
		t.Fatal(err)
	}
}

func relTryNetCreate(h *harness.Host) error {
	_, err := h.Docker("network", "create", "-d", pluginName, "--ipam-driver", pluginName,
		"--subnet", relSubnet, "-o", "overlay=blue", "blue")
	return err
}

// pingRun is a ping running in a container: one echo request every 100 ms.
type pingRun struct {
	what string
	done chan struct{}
	out  string
}

func startPingRun(h *harness.Host, container, ip string, count int) *pingRun {
	r := &pingRun{what: fmt.Sprintf("%s on %s -> %s", container, h.Name, ip), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		out, err := h.Docker("exec", container, "ping", "-q", "-i", "0.1", "-c", strconv.Itoa(count), "-W", "5", ip)
		r.out = out
		if err != nil {
			r.out += "\n" + err.Error()
		}
	}()
	return r
}

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)

// wait returns how many echo requests were sent and answered.
func (r *pingRun) wait(t *testing.T) (sent, received int) {
	t.Helper()
	<-r.done
	m := pingStats.FindStringSubmatch(r.out)
	if m == nil {
		t.Fatalf("ping %s: no statistics in its output:\n%s", r.what, r.out)
	}
	sent, _ = strconv.Atoi(m[1])
	received, _ = strconv.Atoi(m[2])
	return sent, received
}

// watchHostKey watches the store's hosts/ directory and returns a function
// that stops the watch and says how the live key of host went missing, if
// it ever did ("" if never).
func watchHostKey(t *testing.T, st store.Store, host string) func() string {
	t.Helper()
	key := driver.HostKey(host)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ch, err := st.Watch(ctx, driver.HostsDir)
	if err != nil {
		t.Fatalf("watch hosts: %v", err)
	}
	first := make(chan bool, 1)
	var why []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		started := false
		for ev := range ch {
			switch {
			case ev.Type == store.EventDelete && ev.KV.Key == key:
				why = append(why, "deleted at "+time.Now().Format("15:04:05.000"))
			case ev.Type == store.EventReset && !slices.ContainsFunc(ev.Snapshot, func(kv store.KV) bool { return kv.Key == key }):
				why = append(why, "missing from a snapshot at "+time.Now().Format("15:04:05.000"))
			}
			if !started {
				started = true
				first <- ev.Type == store.EventReset && len(why) == 0
			}
		}
	}()
	select {
	case ok := <-first:
		if !ok {
			t.Fatalf("the store has no live key %s to watch", key)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("watch hosts: no first snapshot within 10s")
	}
	return func() string {
		cancel()
		<-done
		return strings.Join(why, "; ")
	}
}

// overlayView is what the kernel of one host has for one overlay.
type overlayView struct {
	inode uint64                   // of the overlay namespace
	links map[string]int           // device name -> ifindex
	fdb   map[string]time.Duration // remote MAC -> time since its VXLAN FDB entry was written
}

// relOverlayNS returns the only overlay namespace of h.
func relOverlayNS(t *testing.T, c *harness.Cluster, h *harness.Host) string {
	t.Helper()
	nss := overlayNamespaces(t, c, h)
	if len(nss) != 1 {
		t.Fatalf("%s has overlay namespaces %v, want exactly one", h.Name, nss)
	}
	return nss[0]
}

func readOverlay(t *testing.T, h *harness.Host, ns string) overlayView {
	t.Helper()
	v := overlayView{links: relLinks(t, h, ns), fdb: map[string]time.Duration{}}
	fi, err := os.Stat(filepath.Join("/run/netns", ns))
	if err != nil {
		t.Fatal(err)
	}
	v.inode = fi.Sys().(*syscall.Stat_t).Ino
	out, err := h.Exec("bridge", "-n", ns, "-s", "fdb", "show", "dev", "vxlan0")
	if err != nil {
		t.Fatal(err)
	}
	// "02:42:0a:46:00:03 dst 192.168.200.12 used 0/12 self permanent":
	// used/updated, in seconds.
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		i := slices.Index(f, "used")
		if len(f) < 3 || f[1] != "dst" || i < 0 || i+1 >= len(f) || f[0] == "00:00:00:00:00:00" {
			continue
		}
		_, updated, _ := strings.Cut(f[i+1], "/")
		secs, err := strconv.Atoi(updated)
		if err != nil {
			t.Fatalf("bridge fdb: cannot read %q", line)
		}
		v.fdb[f[0]] = time.Duration(secs) * time.Second
	}
	return v
}

// relLinks lists the devices of a namespace (the host's own when ns is ""),
// by name, with their ifindex.
func relLinks(t *testing.T, h *harness.Host, ns string) map[string]int {
	t.Helper()
	args := []string{"ip", "-o", "link", "show"}
	if ns != "" {
		args = append([]string{"ip", "-n", ns}, args[1:]...)
	}
	out, err := h.Exec(args...)
	if err != nil {
		t.Fatal(err)
	}
	links := map[string]int{}
	for _, line := range strings.Split(out, "\n") {
		// "5: dnp1234abcd-p@if4: <BROADCAST,...> ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		idx, err := strconv.Atoi(strings.TrimSuffix(f[0], ":"))
		if err != nil {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		links[name] = idx
	}
	return links
}

func relMAC(t *testing.T, h *harness.Host, container string) string {
	t.Helper()
	return h.MustDocker(t, "inspect", "-f", `{{(index .NetworkSettings.Networks "blue").MacAddress}}`, container)
}

func relIP(t *testing.T, h *harness.Host, container string) string {
	t.Helper()
	return h.MustDocker(t, "inspect", "-f", `{{(index .NetworkSettings.Networks "blue").IPAddress}}`, container)
}

// relKeys lists the store keys below dir.
func relKeys(t *testing.T, st store.Store, dir string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kvs, err := st.List(ctx, dir)
	if err != nil {
		t.Fatalf("list store %s: %v", dir, err)
	}
	var keys []string
	for _, kv := range kvs {
		keys = append(keys, kv.Key)
	}
	return keys
}

// relCheckHosts checks that each host has exactly what its containers on
// "blue" need, once the plugins have settled: the store holds one endpoint
// record per attached container and none other of that host; the host has
// one overlay namespace with lo, br0, vxlan0 and one bridge port per local
// endpoint; no endpoint interface or VXLAN device is left in the host
// namespace.
func relCheckHosts(t *testing.T, c *harness.Cluster, st store.Store, hosts ...*harness.Host) {
	t.Helper()
	for _, h := range hosts {
		out := h.MustDocker(t, "network", "inspect", "-f", `{{range .Containers}}{{.EndpointID}} {{end}}`, "blue")
		docker := strings.Fields(out)
		sort.Strings(docker)
		wantLinks := []string{"br0", "lo", "vxlan0"}
		for _, id := range docker {
			wantLinks = append(wantLinks, "dnp"+id[:8]+"-p")
		}
		sort.Strings(wantLinks)

		var stored []string
		var gotLinks, hostLinks []string
		settled := func() bool {
			stored, gotLinks, hostLinks = nil, nil, nil
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			kvs, err := st.List(ctx, driver.EndpointsDir)
			cancel()
			if err != nil {
				t.Fatalf("list endpoints: %v", err)
			}
			for _, kv := range kvs {
				var rec struct {
					Host string `json:"host"`
				}
				if err := json.Unmarshal(kv.Value, &rec); err != nil {
					t.Fatalf("endpoint record %s: %v", kv.Key, err)
				}
				if rec.Host == h.UnderlayIP {
					stored = append(stored, kv.Key[strings.LastIndex(kv.Key, "/")+1:])
				}
			}
			sort.Strings(stored)
			nss := overlayNamespaces(t, c, h)
			if len(nss) != 1 {
				gotLinks = append(gotLinks, fmt.Sprintf("%d overlay namespaces %v", len(nss), nss))
			} else {
				for name := range relLinks(t, h, nss[0]) {
					gotLinks = append(gotLinks, name)
				}
			}
			sort.Strings(gotLinks)
			for name := range relLinks(t, h, "") {
				if strings.HasPrefix(name, "dnp") && !strings.HasPrefix(name, "dnpt-") {
					hostLinks = append(hostLinks, name)
				}
			}
			vx, err := h.Exec("ip", "-o", "link", "show", "type", "vxlan")
			if err != nil {
				t.Fatal(err)
			}
			if vx != "" {
				hostLinks = append(hostLinks, vx)
			}
			return slices.Equal(stored, docker) && slices.Equal(gotLinks, wantLinks) && len(hostLinks) == 0
		}
		deadline := time.Now().Add(15 * time.Second)
		for !settled() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: store records and kernel devices do not match the running containers: endpoints in docker %v, in the store %v; overlay devices %v, want %v; plugin devices in the host namespace %v",
					h.Name, docker, stored, gotLinks, wantLinks, hostLinks)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// relCrashHost kills every process of host h at once (SIGKILL): the
// plugin, dockerd, containerd, the shims and the containers, as a power
// loss would.
func relCrashHost(t *testing.T, h *harness.Host, p *plugin) {
	t.Helper()
	p.Crash(t)
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cgroups, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		// dockerd, containerd and shims name the host's directory; the
		// containers live in its cgroup parent.
		if strings.Contains(string(cmdline), h.Dir+"/") || strings.Contains(string(cgroups), ":/"+h.Hostname+"/") {
			pids = append(pids, pid)
		}
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for syscall.Kill(pid, 0) == nil && time.Now().Before(deadline) {
			if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); strings.Contains(string(b), ") Z ") {
				break // a zombie: dead, waiting for its parent
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The harness reaps its dockerd process and forgets it.
	if err := h.StopDockerd(); err != nil {
		t.Logf("%s: %v", h.Name, err)
	}
	t.Logf("%s crashed: killed %d processes", h.Name, len(pids))
}

// relWipeKernel deletes what a reboot loses: the plugin's kernel objects
// (the overlay namespaces with their devices, any endpoint interface left
// in the host namespace) and dockerd's exec-root (/run is a tmpfs: stale
// pid files there would name processes that no longer exist).
func relWipeKernel(t *testing.T, c *harness.Cluster, h *harness.Host) {
	t.Helper()
	execRoot := filepath.Join(h.Dir, "exec")
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(mounts), " "+execRoot+"/") {
		t.Fatalf("%s: something is still mounted below %s", h.Name, execRoot)
	}
	if err := os.RemoveAll(execRoot); err != nil {
		t.Fatal(err)
	}
	for _, ns := range overlayNamespaces(t, c, h) {
		for name := range relLinks(t, h, ns) {
			if name != "lo" {
				h.Exec("ip", "-n", ns, "link", "del", name)
			}
		}
		if _, err := h.Exec("ip", "netns", "del", ns); err != nil {
			t.Fatal(err)
		}
	}
	for name := range relLinks(t, h, "") {
		if strings.HasPrefix(name, "dnp") && !strings.HasPrefix(name, "dnpt-") {
			h.Exec("ip", "link", "del", name)
		}
	}
}

// relPartition cuts (or restores) host h's traffic to and from the store
// at addr, both ways, silently (DROP), as a network partition would.
func relPartition(t *testing.T, h *harness.Host, addr string, cut bool) {
	t.Helper()
	ip, port, ok := strings.Cut(addr, ":")
	if !ok {
		t.Fatalf("store address %q has no port", addr)
	}
	op := "-I"
	if !cut {
		op = "-D"
	}
	for _, rule := range [][]string{
		{"OUTPUT", "-d", ip, "-p", "tcp", "--dport", port, "-j", "DROP"},
		{"INPUT", "-s", ip, "-p", "tcp", "--sport", port, "-j", "DROP"},
	} {
		if _, err := h.Exec(append([]string{"iptables", "-w", op}, rule...)...); err != nil {
			t.Fatal(err)
		}
	}
}

func relTimed(fn func() error) (time.Duration, error) {
	start := time.Now()
	err := fn()
	return time.Since(start), err
}

// relWantStoreError checks that a docker command failed fast with an error
// that names the store.
func relWantStoreError(t *testing.T, what string, took time.Duration, err error, storeAddr string) {
	t.Helper()
	switch {
	case err == nil:
		t.Errorf("%s: succeeded with the store down", what)
	case took > relFailFast:
		t.Errorf("%s: failed after %s, want within %s: %v", what, took.Round(time.Millisecond), relFailFast, err)
	case !strings.Contains(err.Error(), storeAddr):
		t.Errorf("%s: the error does not name the store %s: %v", what, storeAddr, err)
	default:
		t.Logf("%s: failed in %s: %v", what, took.Round(time.Millisecond), err)
	}
}

// relDockerdAnswers checks that dockerd is not held up by the plugin: it
// lists containers and networks and runs a container without the overlay.
func relDockerdAnswers(t *testing.T, h *harness.Host) {
	t.Helper()
	for _, args := range [][]string{
		{"ps", "-a"},
		{"network", "ls"},
		{"run", "--rm", "--network", "none", harness.Image, "true"},
	} {
		took, err := relTimed(func() error { _, err := h.Docker(args...); return err })
		if err != nil {
			t.Errorf("%s: docker %s: %v", h.Name, strings.Join(args, " "), err)
		} else if took > relAnswerWithin {
			t.Errorf("%s: docker %s took %s, want within %s", h.Name, strings.Join(args, " "), took.Round(time.Millisecond), relAnswerWithin)
		}
	}
}

// relRetry runs fn until it succeeds, for at most d.
func relRetry(t *testing.T, d time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s: %v", d, what, err)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// relRemoveContainersFirst removes every container when the test ends,
// before the store server (started earlier) stops, so that the plugins
// can still record the removals.
func relRemoveContainersFirst(t *testing.T, c *harness.Cluster) {
	t.Cleanup(func() {
		for _, h := range c.Hosts {
			if ids, err := h.Docker("ps", "-aq"); err == nil && ids != "" {
				h.Docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
	})
}
