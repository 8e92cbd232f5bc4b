package integration

import (
	"net/netip"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/simhosts"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// What TestChurn writes: remote endpoints of simulated hosts (store
// records as their plugins would write them), programmed before the churn,
// then adds and removes of others at a steady rate.
const (
	churnSimHosts   = 50
	churnBackground = 3000
	churnRate       = 100 // writes a second
	churnFor        = 10 * time.Second
	// churnLive churn endpoints exist at once: the first 4 s only add,
	// then each add comes with the removal of the oldest, which has lived
	// about 8 s by then, long enough for every host to have shown it.
	churnLive = 400
	// churnConverge bounds the wait for every kernel to match the store.
	churnConverge = 2 * time.Minute
)

// TestChurn: three hosts on etcd, each with a container on one overlay,
// and 3,000 remote endpoints of 50 simulated hosts; then 100 adds and
// removes of simulated endpoints a second for 10 s. Every add reaches
// every host's kernel and every remove goes from it, and afterwards each
// kernel holds exactly the store's endpoints of the other hosts; once the
// simulated endpoints and hosts are removed, nothing of them is left (no
// neighbour entry, no forwarding entry towards a simulated host).
func TestChurn(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	for _, h := range c.Hosts {
		startPlugin(t, c, h, url, "--log-level", "info")
	}
	const subnet = "10.64.0.0/14"
	for _, h := range c.Hosts {
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", subnet, "-o", "overlay=churn", "churn")
		runContainer(t, h, "c-"+h.Name, "churn")
	}
	var hosts []simhosts.Host
	var mons []*simhosts.Monitor
	realHosts := map[netip.Addr]bool{}
	for _, h := range c.Hosts {
		names := overlayNamespaces(t, c, h)
		if len(names) != 1 {
			t.Fatalf("%s: want one overlay namespace, found %v", h.Name, names)
		}
		k, err := simhosts.OpenKernel("/run/netns/" + names[0])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(k.Close)
		addr := netip.MustParseAddr(h.UnderlayIP)
		hosts = append(hosts, simhosts.Host{Name: h.Name, Addr: addr, Kernel: k})
		realHosts[addr] = true
	}

	ctx := testenv.Context(t, 10*time.Minute)
	under := netip.MustParsePrefix(c.Subnet)
	fleet := &simhosts.Fleet{Store: st, Overlay: "churn", Subnet: netip.MustParsePrefix(subnet), Offset: 4096}
	for i := range churnSimHosts {
		b := under.Addr().As4()
		b[3] = byte(100 + i) // where no real host or node is
		fleet.Hosts = append(fleet.Hosts, netip.AddrFrom4(b))
	}
	if err := fleet.RegisterHosts(ctx); err != nil {
		t.Fatal(err)
	}
	if err := fleet.AddRange(ctx, 0, churnBackground); err != nil {
		t.Fatal(err)
	}
	if _, err := fleet.WaitConverged(ctx, hosts, 200*time.Millisecond, churnConverge); err != nil {
		t.Fatalf("programming %d remote endpoints: %v", churnBackground, err)
	}
	for _, h := range hosts {
		if n, err := h.Kernel.CountNeighbours(); err != nil || n != churnBackground+2 {
			t.Fatalf("%s: %d neighbour entries (%v), want %d simulated and 2 real", h.Name, n, err, churnBackground)
		}
	}

	for _, h := range c.Hosts {
		m, err := simhosts.StartMonitor("/run/netns/" + overlayNamespaces(t, c, h)[0])
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(m.Close)
		mons = append(mons, m)
	}
	start := time.Now()
	changes, live, err := fleet.Churn(ctx, 100_000, churnRate, churnFor, churnLive)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d store writes (adds and removes) in %s; %d churn endpoints remain", len(changes),
		time.Since(start).Round(time.Millisecond), len(live))
	settled, err := fleet.WaitConverged(ctx, hosts, 200*time.Millisecond, churnConverge)
	if err != nil {
		t.Fatalf("after the churn: %v", err)
	}
	t.Logf("every kernel matched the store %s after the last write", settled.Sub(simhosts.LastWrite(changes)).Round(time.Millisecond))

	// Every change reached every host: each add appeared, each remove went.
	for i, m := range mons {
		if err := m.Err(); err != nil {
			t.Fatalf("%s: neighbour events lost, cannot check every change: %v", hosts[i].Name, err)
		}
		var notAdded, notRemoved []string
		for _, ch := range changes {
			if ch.Add {
				if _, ok := m.Added(ch.IP); !ok {
					notAdded = append(notAdded, ch.IP.String())
				}
			} else if _, ok := m.Removed(ch.IP); !ok {
				notRemoved = append(notRemoved, ch.IP.String())
			}
		}
		if len(notAdded)+len(notRemoved) > 0 {
			t.Errorf("%s: %d added endpoints never appeared in the kernel (e.g. %v), %d removed ones never went (e.g. %v)",
				hosts[i].Name, len(notAdded), notAdded[:min(5, len(notAdded))], len(notRemoved), notRemoved[:min(5, len(notRemoved))])
		}
	}

	// Nothing is left once the simulated endpoints and hosts are gone.
	n, err := fleet.RemoveAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := fleet.UnregisterHosts(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("removed %d simulated endpoints and %d simulated hosts", n, len(fleet.Hosts))
	if _, err := fleet.WaitConverged(ctx, hosts, 200*time.Millisecond, churnConverge); err != nil {
		t.Fatalf("after removing the simulated endpoints: %v", err)
	}
	for _, h := range hosts {
		if n, err := h.Kernel.CountNeighbours(); err != nil || n != 2 {
			t.Errorf("%s: %d neighbour entries (%v), want the 2 real remote containers", h.Name, n, err)
		}
		waitFor(t, churnConverge, h.Name+": no forwarding entry towards a simulated host", func() bool {
			dsts, err := h.Kernel.FDBHosts()
			if err != nil {
				t.Fatal(err)
			}
			for ip := range dsts {
				if !realHosts[ip] {
					return false
				}
			}
			return true
		})
	}
}
