package bench

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/mcast"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// TestBenchMulticast: what one multicast datagram costs on the underlay
// when only one of three hosts has a receiver, against a link-local group,
// which goes to every host (head-end replication of broadcasts).
func TestBenchMulticast(t *testing.T) {
	needBench(t)
	const n, rate = 1000, 500
	rec := newRecorder(t, "multicast")
	rec.res.Measures = fmt.Sprintf("three Docker hosts on one overlay; a container on host 1 sends %d UDP datagrams (64 bytes) at %d/s "+
		"to a group (239.75.0.1) that only a container on host 2 joined (dnp-mcast, in the test image; neither side names an interface). "+
		"Underlay packets per datagram: packets host 1 put on the underlay during the send (the receive counter of host 1's port "+
		"on the harness's underlay switch; it also counts the little store traffic of that time) divided by datagrams sent. "+
		"Delivery: datagrams the receiver on host 2 got, in percent.", n, rate)
	rec.res.Baseline = "the same send to a link-local group (224.0.0.252), which the overlay replicates to every host as it does " +
		"broadcasts (and as it did every group before issue 16), the receiver again only on host 2; alternating run by run."

	c := newCluster(t, 3)
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	for _, h := range c.Hosts {
		overlayNetwork(t, h, "mcb", "10.75.0.0/24")
	}
	runContainer(t, h1, "s1", "mcb")
	ip2 := runContainer(t, h2, "r2", "mcb")
	runContainer(t, h3, "c3", "mcb")
	deadline := time.Now().Add(30 * time.Second)
	for { // the peers are programmed (and the all-zero FDB entries with them)
		if _, err := h1.Docker("exec", "s1", "ping", "-c", "1", "-W", "1", ip2); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("overlay not working after 30s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	vni := benchOverlayVNI(t, c, h1)

	type sample struct{ perDatagram, delivered, toHost3 float64 }
	measure := func(group string, selective bool) sample {
		t.Helper()
		g := netip.MustParseAddrPort(group).Addr()
		waitReplication := func(want []string) {
			t.Helper()
			deadline := time.Now().Add(20 * time.Second)
			for got := replicationDsts(t, c.Cluster, h1, vni, g); !slices.Equal(got, want); got = replicationDsts(t, c.Cluster, h1, vni, g) {
				if time.Now().After(deadline) {
					t.Fatalf("host 1 replicates %s to %v after 20s, want %v", g, got, want)
				}
				time.Sleep(50 * time.Millisecond)
			}
		}
		if selective { // the previous run's receiver has gone
			waitReplication(nil)
		}
		r := startBenchReceiver(t, h2, "r2", group, n)
		if selective {
			waitReplication([]string{h2.UnderlayIP})
		}
		before := switchCounters(t, c.Cluster)
		if out, err := h1.Docker("exec", "s1", harness.McastTool, "send", "-n", strconv.Itoa(n), "-rate", strconv.Itoa(rate), group); err != nil {
			t.Fatalf("send: %v %s", err, out)
		}
		after := switchCounters(t, c.Cluster)
		res := r.wait(t)
		return sample{
			perDatagram: float64(after["h1"].rx-before["h1"].rx) / n,
			delivered:   100 * float64(res.Unique) / n,
			toHost3:     float64(after["h3"].tx - before["h3"].tx),
		}
	}
	var sel, flood []sample
	for i := range Runs {
		sel = append(sel, measure("239.75.0.1:7501", true))
		flood = append(flood, measure("224.0.0.252:7502", false))
		t.Logf("run %d: selective %.3f packets/datagram, %.1f%% delivered, %.0f packets to host 3; link-local %.3f, %.1f%%, %.0f",
			i+1, sel[i].perDatagram, sel[i].delivered, sel[i].toHost3, flood[i].perDatagram, flood[i].delivered, flood[i].toHost3)
	}
	col := func(s []sample, f func(sample) float64) []float64 {
		var out []float64
		for _, x := range s {
			out = append(out, f(x))
		}
		return out
	}
	per := func(x sample) float64 { return x.perDatagram }
	del := func(x sample) float64 { return x.delivered }
	to3 := func(x sample) float64 { return x.toHost3 }
	rec.res.Rows = []Row{
		{Name: "underlay packets per datagram, group joined on 1 of 3 hosts", Unit: "packets", Samples: col(sel, per),
			BaseName: "link-local group, replicated to every host", Base: col(flood, per)},
		{Name: "delivered to the receiver on host 2", Unit: "%", Samples: col(sel, del),
			BaseName: "link-local group", Base: col(flood, del)},
		{Name: fmt.Sprintf("packets into host 3 (no receiver) per %d datagrams", n), Unit: "packets", Samples: col(sel, to3),
			BaseName: "link-local group", Base: col(flood, to3)},
	}
	rec.note("Host 1 learns where the group's receivers are from the store (each host publishes the groups its bridge snooped) " +
		"and replicates it with the kernel's VXLAN MDB (Linux 6.3+) to those hosts only; see docs/multicast.md.")
	rec.note("The switch counters count every packet of the hosts' underlay ports, including the plugin's store traffic and " +
		"IGMP/MLD queries during the send: a few packets per run, under 0.01 per datagram.")
	rec.save()
}

// benchReceiver is dnp-mcast recv running in a container.
type benchReceiver struct {
	done chan struct{}
	out  string
	err  error
}

// startBenchReceiver starts a receiver of n datagrams in ctr and waits
// until it joined the group.
func startBenchReceiver(t *testing.T, h *harness.Host, ctr, group string, n int) *benchReceiver {
	t.Helper()
	r := &benchReceiver{done: make(chan struct{})}
	ready := "/tmp/ready-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	go func() {
		defer close(r.done)
		r.out, r.err = h.Docker("exec", ctr, harness.McastTool, "recv", "-n", strconv.Itoa(n), "-timeout", "60s", "-idle", "2s", "-ready", ready, group)
	}()
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-r.done:
			t.Fatalf("receiver ended early: %v %s", r.err, r.out)
		default:
		}
		if iface, err := h.Docker("exec", ctr, "cat", ready); err == nil {
			if iface != "eth0" {
				t.Fatalf("receiver joined %s on %q, want eth0", group, iface)
			}
			return r
		}
		if time.Now().After(deadline) {
			t.Fatal("receiver did not join within 20s")
		}
	}
}

func (r *benchReceiver) wait(t *testing.T) mcast.Result {
	t.Helper()
	<-r.done
	var res mcast.Result
	lines := strings.Split(strings.TrimSpace(r.out), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &res); err != nil {
		t.Fatalf("receiver: %v %q", r.err, r.out)
	}
	return res
}

type portCounters struct{ rx, tx uint64 }

// switchCounters reads the packet counters of every host's port on the
// underlay switch (rx: from the host, tx: to the host).
func switchCounters(t *testing.T, c *harness.Cluster) map[string]portCounters {
	t.Helper()
	out := map[string]portCounters{}
	err := harness.DoIn(c.SwitchNetNS, func() error {
		for _, h := range c.Hosts {
			l, err := netlink.LinkByName(h.Name)
			if err != nil {
				return err
			}
			s := l.Attrs().Statistics
			out[h.Name] = portCounters{rx: s.RxPackets, tx: s.TxPackets}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// benchOverlayVNI is the VNI of the one overlay on host h.
func benchOverlayVNI(t *testing.T, c *benchCluster, h *harness.Host) uint32 {
	t.Helper()
	oh := &overlay.Host{NetNS: h.NetNS, Prefix: c.Prefix + "-" + h.Name + "-"}
	ids, err := oh.ListNetworks()
	if err != nil || len(ids) != 1 {
		t.Fatalf("overlays on %s: %v %v", h.Name, ids, err)
	}
	vni, err := strconv.ParseUint(ids[0], 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(vni)
}

// replicationDsts are the hosts h's VXLAN device replicates group to.
func replicationDsts(t *testing.T, c *harness.Cluster, h *harness.Host, vni uint32, group netip.Addr) []string {
	t.Helper()
	oh := &overlay.Host{NetNS: h.NetNS, Prefix: c.Prefix + "-" + h.Name + "-"}
	nw, err := oh.Network(strconv.FormatUint(uint64(vni), 10))
	if err != nil {
		t.Fatal(err)
	}
	st, err := nw.State()
	if err != nil {
		t.Fatal(err)
	}
	var dsts []string
	for _, e := range st.MDB {
		if e.Dev == "vxlan0" && e.Group == group && e.Dst.IsValid() {
			dsts = append(dsts, e.Dst.String())
		}
	}
	slices.Sort(dsts)
	return dsts
}
