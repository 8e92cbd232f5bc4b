package integration

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// What TestStoreClusterFailover asserts and how it paces the failover.
const (
	// clusterMaxFailing bounds the longest run of failing Docker
	// operations on a host around the leader's death: the election and
	// the clients' switch to another member, with room for a loaded
	// machine. Past it, users would see an outage, not a failover.
	clusterMaxFailing = 15 * time.Second
	// clusterMaxOp bounds the slowest Docker operation: etcd holds a
	// write sent to the dying leader for its request timeout (7 s by
	// default) before the plugin can retry it, and a docker run makes
	// several store calls.
	clusterMaxOp = 20 * time.Second
	// clusterWarmup: containers come and go this long before the kill.
	clusterWarmup = 3 * time.Second
	// clusterLeaderDown: the killed leader stays down this long.
	clusterLeaderDown = 8 * time.Second
	// clusterAfter: containers keep coming and going this long after the
	// old leader is back.
	clusterAfter = 5 * time.Second
	// clusterPings is the length of each ping run (one every 100 ms): from
	// before the warm-up until after the churn ends.
	clusterPings = 280
)

// TestStoreClusterFailover runs each store as users run it in production:
// a 3-member etcd cluster, a 3-server ZooKeeper ensemble, a 3-server Consul
// cluster, each member in a namespace of its own on the underlay. The
// plugins name every member (etcd://a,b,c/p, zk://a,b,c/p); with Consul
// each Docker host runs a client agent joined to the servers and its plugin
// uses consul://127.0.0.1:8500/p. While containers on 3 hosts ping each
// other every 100 ms and a loop creates and removes containers on every
// host, the leader is killed (SIGKILL) and, a while later, started again
// with its data. No ping is lost, no live key goes missing, the Docker
// operations fail for at most clusterMaxFailing (the longest window is
// logged per store), and afterwards no two containers share an address and
// the store holds exactly the endpoint and address records of the live
// containers. (Before store.WithFailover, a `docker rm` during the election
// left its endpoint record and address behind: dockerd goes on when the
// driver fails to delete.)
func TestStoreClusterFailover(t *testing.T) {
	for _, kind := range []string{"etcd", "zk", "consul"} {
		t.Run(kind, func(t *testing.T) { testStoreClusterFailover(t, kind) })
	}
}

func testStoreClusterFailover(t *testing.T, kind string) {
	c := harness.New(t, 3, harness.Options{})
	if err := c.AttachRoot(); err != nil {
		t.Fatal(err)
	}
	var members []testenv.ServerOptions
	for i := range 3 {
		n, err := c.AddNode(fmt.Sprintf("s%d", i+1))
		if err != nil {
			t.Fatal(err)
		}
		members = append(members, testenv.ServerOptions{IP: n.UnderlayIP, NetNS: n.NetNS})
	}
	start := time.Now()
	sc := testenv.StartCluster(t, kind, members)
	prefix := "dnp-" + c.ID
	t.Logf("%s cluster of %d up in %s: %s", kind, len(sc.Members), time.Since(start).Round(time.Millisecond), sc.URL(prefix))

	// How users point each host's plugin at the cluster.
	urls := map[*harness.Host]string{}
	for _, h := range c.Hosts {
		urls[h] = sc.URL(prefix)
		if kind == "consul" {
			agent := testenv.StartConsulAgent(t, sc, h.Hostname, testenv.ServerOptions{IP: h.UnderlayIP, NetNS: h.NetNS})
			urls[h] = agent.URL(prefix)
		}
	}
	st, err := stores.Open(context.Background(), store.Config{URL: sc.URL(prefix)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	var plugins []*plugin
	for _, h := range c.Hosts {
		plugins = append(plugins, startPlugin(t, c, h, urls[h]))
	}
	// At the end, containers and plugins go while the store still runs
	// (its members and agents stop in their own, earlier registered,
	// cleanups); a plugin stopping without its store waits on timeouts.
	t.Cleanup(func() {
		for _, h := range c.Hosts {
			if ids, err := h.Docker("ps", "-aq"); err == nil && ids != "" {
				h.Docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
		}
		for _, p := range plugins {
			p.Stop()
		}
	})
	t.Logf("plugin URL on %s: %s", c.Hosts[0].Name, urls[c.Hosts[0]])
	for _, h := range c.Hosts {
		relNetCreate(t, h)
	}
	ips := map[*harness.Host]string{}
	for _, h := range c.Hosts {
		ips[h] = runContainer(t, h, "p-"+h.Name, "blue")
	}
	next := func(i int) *harness.Host { return c.Hosts[(i+1)%len(c.Hosts)] }
	for i, h := range c.Hosts {
		pingEventually(t, h, "p-"+h.Name, ips[next(i)])
	}

	var lostKeys []func() string
	for _, h := range c.Hosts {
		lostKeys = append(lostKeys, watchHostKey(t, st, h.UnderlayIP))
	}
	var pings []*pingRun
	for i, h := range c.Hosts {
		pings = append(pings, startPingRun(h, "p-"+h.Name, ips[next(i)], clusterPings))
	}
	pingStart := time.Now()

	churn := startChurn(c)
	time.Sleep(clusterWarmup)

	// A loaded machine may starve a leader into an election just now: wait
	// for the one that leads.
	leader, err := sc.WaitLeader(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	leader.Kill(t)
	newLeader, err := sc.WaitLeader(30 * time.Second)
	if err != nil {
		t.Fatalf("no new leader after %s was killed: %v", leader.Name, err)
	}
	election := time.Since(killed)
	t.Logf("killed the leader %s (SIGKILL); %s leads after %s", leader.Name, newLeader.Name, election.Round(time.Millisecond))

	time.Sleep(time.Until(killed.Add(clusterLeaderDown)))
	leader.Start(t)
	back := time.Now()
	t.Logf("%s started again with its data after %s down, ready in %s", leader.Name,
		back.Sub(killed).Round(time.Millisecond), time.Since(killed.Add(clusterLeaderDown)).Round(time.Millisecond))
	time.Sleep(clusterAfter)
	ops := churn.stop()

	for i, p := range pings {
		sent, received := p.wait(t)
		t.Logf("%s: %d sent, %d received", p.what, sent, received)
		if sent != clusterPings || received != sent {
			t.Errorf("lost %d of %d pings from %s across the leader's death and return:\n%s", sent-received, sent, c.Hosts[i].Name, p.out)
		}
	}
	if end := pingStart.Add(clusterPings * 100 * time.Millisecond); end.Before(back) {
		t.Errorf("the pings ended %s before the old leader was back: lengthen clusterPings", back.Sub(end).Round(time.Millisecond))
	}
	for i, lost := range lostKeys {
		if why := lost(); why != "" {
			t.Errorf("the live key of %s went missing: %s", c.Hosts[i].Name, why)
		}
	}

	reportChurn(t, kind, ops, killed, election)

	// Afterwards: one address per container, and exactly the records of
	// the live containers.
	checkClusterRecords(t, c, st)
	relCheckHosts(t, c, st, c.Hosts...)
}

// churnOp is one Docker operation of the churn loop.
type churnOp struct {
	host       string
	what       string // "run NAME" or "rm NAME"
	start, end time.Time
	err        error
}

// churn creates and removes containers on every host until stopped, and
// records every operation.
type churn struct {
	stopCh chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	ops    []churnOp
}

// churnKeep is how many churn containers each host keeps alive.
const churnKeep = 2

func startChurn(c *harness.Cluster) *churn {
	ch := &churn{stopCh: make(chan struct{})}
	for _, h := range c.Hosts {
		ch.wg.Go(func() { ch.loop(h) })
	}
	return ch
}

func (ch *churn) do(h *harness.Host, what string, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	op := churnOp{host: h.Name, what: what, start: time.Now()}
	_, op.err = h.DockerCtx(ctx, args...)
	op.end = time.Now()
	ch.mu.Lock()
	ch.ops = append(ch.ops, op)
	ch.mu.Unlock()
	return op.err
}

func (ch *churn) loop(h *harness.Host) {
	var live []string // oldest first, also containers whose run failed
	for n := 1; ; n++ {
		select {
		case <-ch.stopCh:
			return
		default:
		}
		name := fmt.Sprintf("churn-%s-%d", h.Name, n)
		// A failed run may leave the container created: it goes too.
		ch.do(h, "run "+name, "run", "-d", "--init", "--name", name, "--network", "blue", harness.Image, "sleep", "3600")
		live = append(live, name)
		for len(live) > churnKeep {
			if ch.do(h, "rm "+live[0], "rm", "-f", live[0]) != nil {
				break // again after the next run
			}
			live = live[1:]
		}
	}
}

// stop ends the loops and returns what they did.
func (ch *churn) stop() []churnOp {
	close(ch.stopCh)
	ch.wg.Wait()
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return slices.Clone(ch.ops)
}

// reportChurn logs the failed operations and the longest window of
// failures per host (from the start of the first failing operation to the
// start of the next one that worked), and checks it against
// clusterMaxFailing. Each host must have worked after the failover too.
func reportChurn(t *testing.T, kind string, ops []churnOp, killed time.Time, election time.Duration) {
	t.Helper()
	byHost := map[string][]churnOp{}
	for _, op := range ops {
		byHost[op.host] = append(byHost[op.host], op)
	}
	hosts := make([]string, 0, len(byHost))
	for h := range byHost {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	var longest time.Duration
	longestAt := ""
	var slowest time.Duration
	slowestOp := ""
	failed := 0
	for _, h := range hosts {
		hops := byHost[h]
		var windowStart time.Time
		inWindow := false
		for i, op := range hops {
			if d := op.end.Sub(op.start); d > slowest {
				slowest, slowestOp = d, fmt.Sprintf("%s on %s at kill%+.1fs", op.what, h, op.start.Sub(killed).Seconds())
			}
			if op.err != nil {
				failed++
				t.Logf("failed at kill%+.1fs after %s: %s on %s: %s", op.start.Sub(killed).Seconds(),
					op.end.Sub(op.start).Round(time.Millisecond), op.what, h, firstLine(op.err.Error()))
				if !inWindow {
					windowStart, inWindow = op.start, true
				}
			}
			if inWindow && (op.err == nil || i == len(hops)-1) {
				end := op.start
				if op.err != nil {
					end = op.end // failing up to the very end
				}
				if d := end.Sub(windowStart); d > longest {
					longest = d
					longestAt = fmt.Sprintf("%s from kill%+.1fs", h, windowStart.Sub(killed).Seconds())
				}
				inWindow = false
			}
		}
		if last := hops[len(hops)-1]; last.err != nil {
			t.Errorf("%s: the last Docker operation still failed %s after the kill: %s: %v", h,
				last.start.Sub(killed).Round(time.Millisecond), last.what, last.err)
		}
	}
	t.Logf("%s: %d Docker operations on %d hosts, %d failed; longest failing window %s (%s); slowest operation %s (%s); election %s",
		kind, len(ops), len(hosts), failed, longest.Round(time.Millisecond), longestAt,
		slowest.Round(time.Millisecond), slowestOp, election.Round(time.Millisecond))
	if longest > clusterMaxFailing {
		t.Errorf("%s: Docker operations failed for %s in a row (%s), want at most %s: the failover took longer than an election",
			kind, longest.Round(time.Millisecond), longestAt, clusterMaxFailing)
	}
	if slowest > clusterMaxOp {
		t.Errorf("%s: a Docker operation took %s (%s), want at most %s: the failover held it up longer than an election",
			kind, slowest.Round(time.Millisecond), slowestOp, clusterMaxOp)
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(s, "\n")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return s
}

// checkClusterRecords checks, once dockerd has finished releasing what it
// removed, that no two live containers on "blue" share an address and that
// the store holds exactly one endpoint record and one address per live
// container (none lost, none extra).
func checkClusterRecords(t *testing.T, c *harness.Cluster, st store.Store) {
	t.Helper()
	type live struct{ host, ip string }
	var problems []string
	check := func() bool {
		problems = nil
		endpoints := map[string]live{} // endpoint ID -> where
		byIP := map[string][]string{}
		for _, h := range c.Hosts {
			out, err := h.Docker("network", "inspect", "-f",
				`{{range $id, $c := .Containers}}{{$c.Name}} {{$c.EndpointID}} {{$c.IPv4Address}}{{"\n"}}{{end}}`, "blue")
			if err != nil {
				t.Fatal(err)
			}
			for _, line := range strings.Split(out, "\n") {
				f := strings.Fields(line)
				if len(f) != 3 {
					continue
				}
				ip, _, _ := strings.Cut(f[2], "/")
				endpoints[f[1]] = live{h.UnderlayIP, ip}
				byIP[ip] = append(byIP[ip], h.Name+"/"+f[0])
			}
		}
		for ip, who := range byIP {
			if len(who) > 1 {
				problems = append(problems, fmt.Sprintf("address %s is used by %v", ip, who))
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		kvs, err := st.List(ctx, driver.OverlayEndpoints("blue"))
		if err != nil {
			t.Fatalf("list endpoint records: %v", err)
		}
		stored := map[string]bool{}
		for _, kv := range kvs {
			id := kv.Key[strings.LastIndex(kv.Key, "/")+1:]
			stored[id] = true
			want, ok := endpoints[id]
			if !ok {
				problems = append(problems, fmt.Sprintf("extra endpoint record %s: %s", kv.Key, kv.Value))
				continue
			}
			if !strings.Contains(string(kv.Value), `"host":"`+want.host+`"`) || !strings.Contains(string(kv.Value), `"ipv4":"`+want.ip+"/") {
				problems = append(problems, fmt.Sprintf("endpoint record %s is %s, want host %s address %s", kv.Key, kv.Value, want.host, want.ip))
			}
		}
		for id, l := range endpoints {
			if !stored[id] {
				problems = append(problems, fmt.Sprintf("lost endpoint record of %s on %s (%s)", l.ip, l.host, id[:12]))
			}
		}
		for _, h := range c.Hosts {
			held, err := ipam.HostAddresses(ctx, st, h.UnderlayIP)
			if err != nil {
				t.Fatal(err)
			}
			addrs := map[string]bool{}
			for _, a := range held {
				addrs[a.Address] = true
				if l := byIP[a.Address]; len(l) == 0 || !strings.HasPrefix(l[0], h.Name+"/") {
					problems = append(problems, fmt.Sprintf("extra address %s allocated by %s (containers there: %v)", a.Address, h.Name, l))
				}
			}
			for _, l := range endpoints {
				if l.host == h.UnderlayIP && !addrs[l.ip] {
					problems = append(problems, fmt.Sprintf("lost address record of %s on %s", l.ip, h.Name))
				}
			}
		}
		return len(problems) == 0
	}
	deadline := time.Now().Add(20 * time.Second)
	for !check() {
		if time.Now().After(deadline) {
			t.Fatalf("after the failover:\n  %s", strings.Join(problems, "\n  "))
		}
		time.Sleep(500 * time.Millisecond)
	}
}
