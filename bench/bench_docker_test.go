package bench

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/simhosts"
)

// TestBenchAttach: wall time of `docker run --rm --init <img> true` on an
// overlay of the plugin against Docker's built-in bridge driver.
func TestBenchAttach(t *testing.T) {
	needBench(t)
	rec := newRecorder(t, "attach")
	rec.res.Measures = "wall time of `docker run --rm --init " + harness.Image + " true` (create, attach, start, " +
		"exit, detach, remove) with the container on an overlay network of the plugin (legacy plugin on its unix socket, " +
		"etcd store on the underlay), as the docker CLI sees it."
	rec.res.Baseline = "the same command on a network of Docker's built-in bridge driver, on the same daemon, " +
		"alternating with the overlay run by run."
	c := newCluster(t, 1)
	h := c.Hosts[0]
	overlayNetwork(t, h, "att", "10.73.0.0/24")
	h.MustDocker(t, "network", "create", "-d", "bridge", "--subnet", "10.74.0.0/24", "attbr")

	runOnce := func(network string) (float64, error) {
		d, err := timed(func() error {
			_, err := h.Docker("run", "--rm", "--init", "--network", network, harness.Image, "true")
			return err
		})
		return d.Seconds() * 1000, err
	}
	// One unmeasured run each: first use loads the image layers and the plugin connection.
	for _, n := range []string{"att", "attbr"} {
		if _, err := runOnce(n); err != nil {
			t.Fatal(err)
		}
	}
	var over, bridge []float64
	for i := range Runs {
		v, err := runOnce("att")
		if err != nil {
			t.Fatalf("run %d, overlay: %v", i+1, err)
		}
		over = append(over, v)
		if v, err = runOnce("attbr"); err != nil {
			t.Fatalf("run %d, bridge: %v", i+1, err)
		}
		bridge = append(bridge, v)
		t.Logf("run %d: overlay %.0f ms, bridge %.0f ms", i+1, over[i], bridge[i])
	}
	rec.res.Rows = []Row{{Name: "docker run --rm on the plugin's overlay", Unit: "ms", Samples: over,
		BaseName: "Docker bridge driver", Base: bridge}}
	rec.note("One unmeasured run on each network first. The plugin's share is the store writes and netlink work of " +
		"RequestAddress, CreateEndpoint, Join, Leave, DeleteEndpoint and ReleaseAddress.")
	rec.save()
}

// TestBenchConvergence: time from `docker run -d` on host 1 returning until
// a container on host 2 gets its first ping reply from the new container.
func TestBenchConvergence(t *testing.T) {
	needBench(t)
	const containers = 50
	rec := newRecorder(t, "convergence")
	rec.res.Percentiles = true
	rec.res.Measures = fmt.Sprintf("for each of %d containers, one after another: a container on host 2 sends ICMP echo "+
		"requests every 2 ms (raw socket in its namespace, ARP retried every 10 ms) to the fixed address (`--ip`) of a container "+
		"about to start on host 1. First row, as the issue defines it: from `docker run -d` on host 1 returning to the first echo "+
		"reply; a negative value means the reply came before the docker CLI returned. Second row: the same reply timed from the "+
		"moment `docker run -d` was started. Third row: from that moment until host 2's kernel holds the new container's static "+
		"neighbour entry (netlink event in host 2's overlay namespace): the store write, watch and programming path; "+
		"it has no baseline of its own.", containers)
	rec.res.Baseline = "the same first-reply measurement on Docker's built-in bridge driver, both containers on host 1 " +
		"(no second host, no store), alternating with the overlay container by container."
	c := newCluster(t, 2)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	for _, h := range c.Hosts {
		overlayNetwork(t, h, "conv", "10.75.0.0/16")
	}
	h1.MustDocker(t, "network", "create", "-d", "bridge", "--subnet", "10.76.0.0/16", "convbr")
	runContainer(t, h2, "pinger", "conv")
	runContainer(t, h1, "pinger-br", "convbr")
	pOver, pBridge := mustPinger(t, h2, "pinger"), mustPinger(t, h1, "pinger-br")

	// Neighbour entries appearing in host 2's overlay namespace.
	programmed, err := simhosts.StartMonitor(overlayNS(t, c.Cluster, h2))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(programmed.Close)

	// measure starts one container on host 1 and returns when docker run
	// was invoked and returned, when p got the first echo reply from the
	// new container and (on the overlay) when host 2 had its neighbour entry.
	type sample struct{ invoked, returned, reply, programmed time.Time }
	measure := func(network, ip string, p *pinger) (sample, error) {
		type res struct {
			at  time.Time
			err error
		}
		ch := make(chan res, 1)
		go func() {
			at, err := p.firstReply(net.ParseIP(ip), 2*time.Millisecond, 30*time.Second)
			ch <- res{at, err}
		}()
		name := "c-" + strings.ReplaceAll(ip, ".", "-")
		var s sample
		s.invoked = time.Now()
		if _, err := h1.Docker("run", "-d", "--init", "--name", name, "--network", network, "--ip", ip,
			harness.Image, "sleep", "3600"); err != nil {
			<-ch
			return s, err
		}
		s.returned = time.Now()
		r := <-ch
		if r.err != nil {
			return s, r.err
		}
		s.reply = r.at
		if network == "conv" {
			at, err := programmed.WaitAdded(netip.MustParseAddr(ip), 30*time.Second)
			if err != nil {
				return s, err
			}
			s.programmed = at
		}
		if _, err := h1.Docker("rm", "-f", name); err != nil {
			return s, err
		}
		return s, nil
	}

	var overRet, overInv, prog, bridgeRet, bridgeInv []float64
	for i := range containers {
		o, err := measure("conv", fmt.Sprintf("10.75.1.%d", 10+i), pOver)
		if err != nil {
			t.Fatalf("container %d, overlay: %v", i+1, err)
		}
		b, err := measure("convbr", fmt.Sprintf("10.76.1.%d", 10+i), pBridge)
		if err != nil {
			t.Fatalf("container %d, bridge: %v", i+1, err)
		}
		overRet = append(overRet, ms(o.reply.Sub(o.returned)))
		overInv = append(overInv, ms(o.reply.Sub(o.invoked)))
		prog = append(prog, ms(o.programmed.Sub(o.invoked)))
		bridgeRet = append(bridgeRet, ms(b.reply.Sub(b.returned)))
		bridgeInv = append(bridgeInv, ms(b.reply.Sub(b.invoked)))
		t.Logf("container %d: overlay: docker run took %.0f ms, first reply at %.0f ms, entry on host 2 at %.0f ms; bridge: run took %.0f ms, first reply at %.0f ms",
			i+1, ms(o.returned.Sub(o.invoked)), overInv[i], prog[i], ms(b.returned.Sub(b.invoked)), bridgeInv[i])
	}
	rec.res.Rows = []Row{
		{Name: "first ping reply on host 2, after `docker run -d` on host 1 returned (overlay)", Unit: "ms", Samples: overRet,
			BaseName: "Docker bridge, same host", Base: bridgeRet},
		{Name: "first ping reply on host 2, after `docker run -d` on host 1 was started (overlay)", Unit: "ms", Samples: overInv,
			BaseName: "Docker bridge, same host", Base: bridgeInv},
		{Name: "new container's neighbour entry on host 2, after `docker run -d` was started", Unit: "ms", Samples: prog},
	}
	if m := Summarize(overRet).Median; m < 0 {
		rec.note("In this run the new container usually answered before `docker run -d` returned (median %.0f ms before): "+
			"the plugin records the endpoint in the store at CreateEndpoint, before the container's process starts, and the "+
			"docker CLI returns only after the start completes. Ratios of such negative times are left out.", -m)
	}
	rec.note("Runs = containers. The pinger only ever sees the new container's own replies (matched by source address and echo id).")
	rec.save()
}

func mustPinger(t *testing.T, h *harness.Host, container string) *pinger {
	t.Helper()
	ns := containerNetNS(t, h, container)
	if err := setARPRetrans(ns, "eth0", 10); err != nil {
		t.Fatal(err)
	}
	p, err := newPinger(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// overlayNS is the path of the only overlay namespace of h's plugin.
func overlayNS(t *testing.T, c *harness.Cluster, h *harness.Host) string {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), c.Prefix+"-"+h.Name+"-") {
			found = append(found, "/run/netns/"+e.Name())
		}
	}
	if len(found) != 1 {
		t.Fatalf("want one overlay namespace of %s, found %v", h.Name, found)
	}
	return found[0]
}
