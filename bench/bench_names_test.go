package bench

import (
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/names"
)

// TestBenchNames: how long after `docker run -d` (or `docker rm -f`) on
// host 1 returned a container on host 2 resolves the new name (or no
// longer does), against Docker's own DNS for a container on host 2 itself.
func TestBenchNames(t *testing.T) {
	needBench(t)
	const containers = 50
	rec := newRecorder(t, "names")
	rec.res.Percentiles = true
	rec.res.Measures = fmt.Sprintf("for each of %d containers, one after another: a container on host 2 asks Docker's embedded DNS "+
		"(127.0.0.11, from a socket in its namespace) for the name of a container about to start on host 1 every 2 ms, "+
		"from the moment `docker run -d --name` on host 1 returned until the answer is the new container's address; "+
		"then from the moment `docker rm -f` returned until the name no longer resolves. The daemons' \"dns\" setting names "+
		"the plugin's name server (docs/names.md). A negative value means the name resolved before the docker CLI returned.", containers)
	rec.res.Baseline = "the same measurements for a container started on host 2 itself, which Docker's own embedded DNS " +
		"answers (no plugin involved), alternating with the other host's container by container."
	c := newClusterOpts(t, 2, harness.Options{DNS: func(*harness.Cluster) []string { return []string{names.DefaultAddr.String()} }})
	h1, h2 := c.Hosts[0], c.Hosts[1]
	for _, h := range c.Hosts {
		overlayNetwork(t, h, "nm", "10.77.0.0/16")
	}
	runContainer(t, h2, "asker", "nm")
	ask := containerNetNS(t, h2, "asker")

	// measure starts a container named name on h, then removes it, and
	// returns how long after each docker command returned the name
	// resolved from host 2, and stopped resolving.
	measure := func(h *harness.Host, name string) (appear, vanish time.Duration, err error) {
		if _, err := h.Docker("run", "-d", "--init", "--name", name, "--network", "nm", harness.Image, "sleep", "3600"); err != nil {
			return 0, 0, err
		}
		returned := time.Now()
		seen, addr, err := waitResolve(ask, name, func(a []string) bool { return len(a) == 1 }, 30*time.Second)
		if err != nil {
			return 0, 0, err
		}
		ip, err := h.Docker("inspect", "-f", `{{(index .NetworkSettings.Networks "nm").IPAddress}}`, name)
		if err != nil {
			return 0, 0, err
		}
		if !slices.Equal(addr, []string{ip}) {
			return 0, 0, fmt.Errorf("%s resolved to %v, its address is %s", name, addr, ip)
		}
		if _, err := h.Docker("rm", "-f", name); err != nil {
			return 0, 0, err
		}
		removed := time.Now()
		gone, _, err := waitResolve(ask, name, func(a []string) bool { return len(a) == 0 }, 30*time.Second)
		if err != nil {
			return 0, 0, err
		}
		return seen.Sub(returned), gone.Sub(removed), nil
	}

	var appear, vanish, baseAppear, baseVanish []float64
	for i := range containers {
		a, v, err := measure(h1, fmt.Sprintf("remote-%d", i))
		if err != nil {
			t.Fatalf("container %d on host 1: %v", i+1, err)
		}
		ba, bv, err := measure(h2, fmt.Sprintf("local-%d", i))
		if err != nil {
			t.Fatalf("container %d on host 2: %v", i+1, err)
		}
		appear, vanish = append(appear, ms(a)), append(vanish, ms(v))
		baseAppear, baseVanish = append(baseAppear, ms(ba)), append(baseVanish, ms(bv))
		t.Logf("container %d: host 1's resolves on host 2 %.1f ms after docker run returned, gone %.1f ms after docker rm; host 2's own: %.1f ms, %.1f ms",
			i+1, ms(a), ms(v), ms(ba), ms(bv))
	}
	rec.res.Rows = []Row{
		{Name: "name of a new container on host 1 resolves on host 2, after `docker run -d` returned", Unit: "ms", Samples: appear,
			BaseName: "Docker's own DNS, container on host 2", Base: baseAppear},
		{Name: "name of a removed container on host 1 stops resolving on host 2, after `docker rm -f` returned", Unit: "ms", Samples: vanish,
			BaseName: "Docker's own DNS, container on host 2", Base: baseVanish},
	}
	rec.note("Runs = containers. The goal (issue 14) is under 1 s for both, at p99.")
	rec.save()
}

// waitResolve asks Docker's embedded DNS in the namespace ns for name every
// 2 ms until ok(addresses) and returns when that was so, with the answer.
func waitResolve(ns, name string, ok func([]string) bool, timeout time.Duration) (time.Time, []string, error) {
	deadline := time.Now().Add(timeout)
	var last []string
	var lastErr error
	for time.Now().Before(deadline) {
		last, lastErr = resolveIn(ns, name)
		if lastErr == nil && ok(last) {
			return time.Now(), last, nil
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Time{}, last, fmt.Errorf("%s: not as wanted within %s: %v (%v)", name, timeout, last, lastErr)
}

// resolveIn returns the A answers for name from 127.0.0.11 in namespace ns.
func resolveIn(ns, name string) ([]string, error) {
	var conn net.Conn
	err := harness.DoIn(ns, func() error {
		var err error
		conn, err = net.Dial("udp", "127.0.0.11:53")
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	resp, _, err := (&dns.Client{Timeout: 5 * time.Second}).ExchangeWithConn(q, &dns.Conn{Conn: conn})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, rr := range resp.Answer {
		if a, ok := rr.(*dns.A); ok {
			out = append(out, a.A.String())
		}
	}
	return out, nil
}
