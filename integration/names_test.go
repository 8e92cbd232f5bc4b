package integration

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/names"
)

// namesFresh bounds how long after docker run (or rm) returned a name
// must resolve (or stop resolving) on another host. The goal is 1 s (the
// benchmark measures it); the bound leaves room for a loaded machine.
const namesFresh = 2 * time.Second

// TestNames: names across hosts, as docs/names.md sets them up: daemon.json
// "dns" naming the plugin's name server and then the host's usual
// resolver (the switch, with a stub DNS server), the legacy plugin on
// three hosts sharing etcd, each host its own Compose project (Compose
// where the engine has it, else the docker commands it would run) with the
// same networks block. From another host a container resolves service
// names, container names, aliases (one held on two hosts gives both),
// AAAA and PTR; overlays are isolated, a container on two overlays sees
// both, local names and the outside world resolve as before, --internal
// overlays resolve too. New and removed containers show within
// namesFresh; names survive a plugin kill -9 and a store outage (and a
// kill -9 during an outage), and go with a lost host's endpoints.
func TestNames(t *testing.T) {
	c := harness.New(t, 3, harness.Options{DNS: namesDNS})
	srv, url, st := kvServerProc(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	stubResolver(t, c)
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	plugins := map[string]*plugin{}
	for _, h := range c.Hosts {
		plugins[h.Name] = startPlugin(t, c, h, url)
	}
	start := time.Now()
	projectUp(t, c, h1, "p1", []namesSvc{
		{name: "web", nets: []string{"blue"}, aliases: []string{"front"}},
		{name: "worker", nets: []string{"blue"}},
		{name: "iweb", nets: []string{"inner"}},
	})
	projectUp(t, c, h2, "p2", []namesSvc{
		{name: "worker", nets: []string{"blue"}},
		{name: "db", nets: []string{"red"}},
	})
	projectUp(t, c, h3, "p3", []namesSvc{
		{name: "client", nets: []string{"blue"}},
		{name: "redclient", nets: []string{"red"}},
		{name: "both", nets: []string{"blue", "red"}},
		{name: "iclient", nets: []string{"inner"}},
	})
	how := "docker run"
	if c.Engine.Compose != "" {
		how = "compose"
	}
	t.Logf("three projects up (%s) in %s", how, time.Since(start).Round(time.Millisecond))

	web4 := ctrIP(t, h1, "p1-web-1", "p1_blue", false)
	web6 := ctrIP(t, h1, "p1-web-1", "p1_blue", true)
	w1 := ctrIP(t, h1, "p1-worker-1", "p1_blue", false)
	w2 := ctrIP(t, h2, "p2-worker-1", "p2_blue", false)
	db := ctrIP(t, h2, "p2-db-1", "p2_red", false)
	iweb := ctrIP(t, h1, "p1-iweb-1", "p1_inner", false)
	client4 := ctrIP(t, h3, "p3-client-1", "p3_blue", false)
	both4 := ctrIP(t, h3, "p3-both-1", "p3_blue", false)
	client := dnsOf(t, h3, "p3-client-1")
	redclient := dnsOf(t, h3, "p3-redclient-1")
	both := dnsOf(t, h3, "p3-both-1")
	iclient := dnsOf(t, h3, "p3-iclient-1")
	worker1 := dnsOf(t, h1, "p1-worker-1")
	const (
		A    = dns.TypeA
		AAAA = dns.TypeAAAA
		PTR  = dns.TypePTR
	)
	rev := func(ip string) string { r, _ := dns.ReverseAddr(ip); return r }

	// What a container on another host sees.
	client.want(t, 10*time.Second, "service name", "web", A, web4)
	client.want(t, 0, "container name", "p1-web-1", A, web4)
	client.want(t, 0, "network alias", "front", A, web4)
	client.want(t, 0, "AAAA", "web", AAAA, web6)
	client.want(t, 0, "an alias held by containers on two hosts gives both addresses", "worker", A, w1, w2)
	client.want(t, 0, "PTR", rev(web4), PTR, "p1-web-1.p1_blue.")
	client.want(t, 0, "PTR (IPv6)", rev(web6), PTR, "p1-web-1.p1_blue.")
	client.want(t, 0, "a name on another overlay (red) does not resolve on blue", "db", A)
	client.want(t, 0, "local names resolve as Docker does", "p3-both-1", A, both4)
	client.want(t, 0, "the outside world resolves through the host's usual resolver", outsideName, A, outsideAddr)
	redclient.want(t, 0, "red resolves its own names", "db", A, db)
	redclient.want(t, 0, "a name with no IPv6 address: AAAA empty", "db", AAAA)
	redclient.want(t, 0, "blue's names do not resolve on red", "web", A)
	redclient.want(t, 0, "nor blue's addresses", rev(web4), PTR)
	both.want(t, 0, "a container on blue and red resolves blue's names", "web", A, web4)
	both.want(t, 0, "a container on blue and red resolves red's names", "db", A, db)
	iclient.want(t, 10*time.Second, "an --internal overlay resolves its names across hosts", "iweb", A, iweb)
	worker1.want(t, 0, "the other way round: h1 resolves h3's container", "client", A, client4)
	webID := h1.MustDocker(t, "inspect", "-f", "{{.Id}}", "p1-web-1")
	client.want(t, 0, "short container ID", webID[:12], A, web4)
	t.Logf("names resolve across hosts: web %s/%s, worker %s+%s, db %s, iweb %s", web4, web6, w1, w2, db, iweb)

	// Containers on no overlay of the plugin (a Docker bridge network) have
	// the same dns setting: the plugin answers REFUSED on the address in
	// the host's namespace, and they go on to the next server.
	h3.MustDocker(t, "network", "create", "-d", "bridge", "--subnet", "10.59.0.0/24", "nmbr")
	runContainer(t, h3, "onbridge", "nmbr")
	dnsOf(t, h3, "onbridge").want(t, 0, "a container on a Docker bridge network: the outside world", outsideName, A, outsideAddr)
	namesCheckHostRefuses(t, h3)

	// As users see it: programs in the container use the names.
	if out, err := h3.Docker("exec", "p3-client-1", "ping", "-c", "1", "-W", "2", "web"); err != nil {
		t.Errorf("ping web from p3-client-1: %v %s", err, out)
	}
	if out, err := h3.Docker("exec", "p3-client-1", "nslookup", "worker"); err != nil || !strings.Contains(out, w1) || !strings.Contains(out, w2) {
		t.Errorf("nslookup worker in p3-client-1: want %s and %s: %v\n%s", w1, w2, err, out)
	}

	// The name server answers on the local bridge: ARP for its address,
	// present on every host, never leaves the host.
	namesCheckLocalARP(t, c, h3, client)

	// Fresh: a new container resolves on another host, a removed one stops.
	h1.MustDocker(t, "run", "-d", "--init", "--name", "fresh", "--network", "p1_blue", harness.Image, "sleep", "3600")
	ran := time.Now()
	fresh := ctrIP(t, h1, "fresh", "p1_blue", false)
	client.until(t, 10*time.Second, "a new container's name resolves on another host", "fresh", func(a []string) bool { return slices.Equal(a, []string{fresh}) })
	took := time.Since(ran)
	h1.MustDocker(t, "rm", "-f", "fresh")
	removed := time.Now()
	client.until(t, 10*time.Second, "a removed container's name stops resolving", "fresh", func(a []string) bool { return len(a) == 0 })
	gone := time.Since(removed)
	t.Logf("docker run returned -> resolves on h3 in %s; docker rm returned -> gone on h3 in %s", took.Round(time.Millisecond), gone.Round(time.Millisecond))
	if took > namesFresh || gone > namesFresh {
		t.Errorf("names took %s to appear and %s to go, want under %s", took, gone, namesFresh)
	}

	// A container on two overlays keeps resolving when it leaves either
	// (each of its interfaces has a route to the name server).
	h3.MustDocker(t, "network", "disconnect", "p3_blue", "p3-both-1")
	both.want(t, 5*time.Second, "after leaving blue: red's names", "db", A, db)
	both.want(t, 5*time.Second, "after leaving blue: not blue's", "web", A)
	h3.MustDocker(t, "network", "connect", "--alias", "both", "p3_blue", "p3-both-1")
	both.want(t, 5*time.Second, "back on blue: blue's names", "web", A, web4)
	h3.MustDocker(t, "network", "disconnect", "p3_red", "p3-both-1")
	both.want(t, 5*time.Second, "after leaving red: blue's names", "web", A, web4)
	both.want(t, 5*time.Second, "after leaving red: not red's", "db", A)

	// kill -9 of h1's plugin: other hosts keep resolving h1's names all
	// along; h1's containers resolve again once it is back.
	remote := client.poll("web", []string{web4})
	local := worker1.poll("client", []string{client4})
	time.Sleep(300 * time.Millisecond)
	plugins[h1.Name].Crash(t)
	crashed := time.Now()
	plugins[h1.Name].Start(t)
	worker1.until(t, relConverge, "h1's containers resolve names again after its plugin restarted", "client", func(a []string) bool { return slices.Equal(a, []string{client4}) })
	back := time.Since(crashed)
	time.Sleep(300 * time.Millisecond)
	rTotal, rBad, _, rLast := remote.end()
	lTotal, lBad, lSpan, _ := local.end()
	t.Logf("plugin of h1 killed: h3 resolved web %d/%d times meanwhile; h1 resolved client again %s after the kill (%d/%d lookups failed over %s)",
		rTotal-rBad, rTotal, back.Round(time.Millisecond), lBad, lTotal, lSpan.Round(time.Millisecond))
	if rBad > 0 {
		t.Errorf("while h1's plugin restarted, %d of %d lookups of web on h3 failed (last: %s)", rBad, rTotal, rLast)
	}
	client.want(t, 0, "after h1's plugin restarted", "worker", A, w1, w2)

	// Store outage: what is known stays known.
	srv.Stop(t)
	client.want(t, 0, "during a store outage", "worker", A, w1, w2)
	worker1.want(t, 0, "during a store outage", "client", A, client4)
	iclient.want(t, 0, "during a store outage", "iweb", A, iweb)
	// ... also by a plugin that restarts meanwhile (from its cache file).
	plugins[h1.Name].Crash(t)
	plugins[h1.Name].Start(t)
	worker1.want(t, 5*time.Second, "after a plugin restart during a store outage", "client", A, client4)
	client.want(t, 0, "after h1's plugin restarted during a store outage", "web", A, web4)
	srv.Start(t)
	client.want(t, relConverge, "after the store outage", "web", A, web4)

	// Host loss: h2 is cut from the store. Within the liveness TTL its
	// names go with its endpoints; when it is back, they come back.
	relPartition(t, h2, srv.Addr, true)
	healed := false
	t.Cleanup(func() {
		if !healed {
			relPartition(t, h2, srv.Addr, false)
		}
	})
	cut := time.Now()
	client.until(t, hostLossBound, "a lost host's names go", "worker", func(a []string) bool { return slices.Equal(a, []string{w1}) })
	lost := time.Since(cut)
	client.want(t, 0, "a lost host's container name goes", "p2-worker-1", A)
	both.want(t, 0, "a lost host's names go on every overlay", "p2-db-1", A)
	relPartition(t, h2, srv.Addr, false)
	healed = true
	heal := time.Now()
	client.until(t, relConverge, "a returning host's names come back", "worker", func(a []string) bool { return slices.Equal(a, []string{w1, w2}) })
	t.Logf("h2 cut from the store: its names gone from h3 after %s, back %s after the cut healed",
		lost.Round(100*time.Millisecond), time.Since(heal).Round(100*time.Millisecond))

	// Everything goes, and the names with it.
	for _, h := range c.Hosts {
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
	}
	waitFor(t, 20*time.Second, "no names left in the store", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		kvs, err := st.List(ctx, names.Dir)
		return err == nil && len(kvs) == 0
	})
}

// namesCheckLocalARP checks that the container's neighbour entry for the
// name server's address is the bridge of an overlay of its own host.
func namesCheckLocalARP(t *testing.T, c *harness.Cluster, h *harness.Host, d ctrDNS) {
	t.Helper()
	out, err := harness.ExecIn(d.netns, "ip", "neigh", "show", names.DefaultAddr.String())
	f := strings.Fields(out)
	i := slices.Index(f, "lladdr")
	if err != nil || i < 0 || i+1 >= len(f) {
		t.Errorf("%s: no neighbour entry for %s: %q %v", d.name, names.DefaultAddr, out, err)
		return
	}
	mac := f[i+1]
	for _, host := range c.Hosts {
		for _, ns := range overlayNamespaces(t, c, host) {
			br, _ := host.Exec("ip", "-n", ns, "-o", "link", "show", "br0")
			if strings.Contains(br, " "+mac+" ") {
				if host != h {
					t.Errorf("%s on %s reaches the name server at %s of %s's bridge (%s): ARP left the host", d.name, h.Name, mac, host.Name, ns)
				}
				return
			}
		}
	}
	t.Errorf("%s: neighbour %s of %s is no overlay bridge", d.name, mac, names.DefaultAddr)
}

// TestNamesManaged: the managed plugin (Docker socket mounted through
// config.json's dockersock mount) on two hosts: names resolve both ways;
// a kill -9 of one host's plugin (dockerd restarts it) leaves the other
// host resolving its names all along, and its own containers resolve
// again once it is back.
func TestNamesManaged(t *testing.T) {
	c := harness.New(t, 2, harness.Options{DNS: namesDNS})
	url, _ := kvServer(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	stubResolver(t, c)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	plugins := map[string]*harness.ManagedPlugin{}
	for _, h := range c.Hosts {
		plugins[h.Name] = installManaged(t, c, h, "DNP_STORE="+url, "DNP_ADVERTISE_ADDR="+h.UnderlayIP, "DNP_LIVE_TTL=10s")
		netCreateManaged(t, h, "blue", "10.54.0.0/24")
	}
	ip1 := runContainer(t, h1, "one", "blue", "--network-alias", "svc")
	ip2 := runContainer(t, h2, "two", "blue", "--network-alias", "svc")
	one, two := dnsOf(t, h1, "one"), dnsOf(t, h2, "two")
	one.want(t, 10*time.Second, "h1 resolves h2's container", "two", dns.TypeA, ip2)
	two.want(t, 10*time.Second, "h2 resolves h1's container", "one", dns.TypeA, ip1)
	two.want(t, 0, "the outside world", outsideName, dns.TypeA, outsideAddr)
	t.Logf("managed plugin: one %s and two %s resolve each other across hosts", ip1, ip2)

	remote := two.poll("one", []string{ip1})
	local := one.poll("two", []string{ip2})
	time.Sleep(300 * time.Millisecond)
	oldPID, err := plugins[h1.Name].Kill()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	if _, err := plugins[h1.Name].WaitRestarted(oldPID); err != nil {
		t.Fatal(err)
	}
	restarted := time.Since(killed)
	one.until(t, relConverge, "h1's containers resolve names again after its plugin restarted", "two", func(a []string) bool { return slices.Equal(a, []string{ip2}) })
	back := time.Since(killed)
	time.Sleep(300 * time.Millisecond)
	rTotal, rBad, _, rLast := remote.end()
	lTotal, lBad, lSpan, _ := local.end()
	t.Logf("h1's plugin killed, restarted by dockerd in %s: h2 resolved one %d/%d times meanwhile; h1 resolved two again %s after the kill (%d/%d lookups failed over %s)",
		restarted.Round(time.Millisecond), rTotal-rBad, rTotal, back.Round(time.Millisecond), lBad, lTotal, lSpan.Round(time.Millisecond))
	if rBad > 0 {
		t.Errorf("while h1's plugin restarted, %d of %d lookups on h2 failed (last: %s)", rBad, rTotal, rLast)
	}
	ip3 := runContainer(t, h1, "three", "blue")
	two.want(t, namesFresh, "a container started after the restart", "three", dns.TypeA, ip3)
}

// namesCheckHostRefuses checks that the name server's address in h's own
// namespace answers REFUSED.
func namesCheckHostRefuses(t *testing.T, h *harness.Host) {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion("web.", dns.TypeA)
	var resp *dns.Msg
	err := h.Do(func() error {
		var err error
		resp, _, err = (&dns.Client{Timeout: 2 * time.Second}).Exchange(q, names.DefaultAddr.String()+":53")
		return err
	})
	if err != nil || resp.Rcode != dns.RcodeRefused {
		t.Errorf("%s: %s in the host's namespace: %v %v, want REFUSED", h.Name, names.DefaultAddr, resp, err)
	}
}
