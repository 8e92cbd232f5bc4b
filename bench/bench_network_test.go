package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// twoHosts is a two-host cluster with one overlay and a container on each
// host: the setup of the throughput and latency benchmarks.
type twoHosts struct {
	c                    *benchCluster
	h1, h2               *harness.Host
	ip1, ip2             string // container addresses on the overlay
	ns1, ns2             string // container network namespaces
	hostNS1, hostNS2     string // host network namespaces (the underlay ends)
	underlay1, underlay2 string
}

func newTwoHosts(t *testing.T, network, subnet string, netOpts ...string) *twoHosts {
	t.Helper()
	c := newCluster(t, 2)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	for _, h := range c.Hosts {
		overlayNetwork(t, h, network, subnet, netOpts...)
	}
	x := &twoHosts{c: c, h1: h1, h2: h2, hostNS1: h1.NetNS, hostNS2: h2.NetNS,
		underlay1: h1.UnderlayIP, underlay2: h2.UnderlayIP}
	x.ip1 = runContainer(t, h1, "c1", network)
	x.ip2 = runContainer(t, h2, "c2", network)
	x.ns1 = containerNetNS(t, h1, "c1")
	x.ns2 = containerNetNS(t, h2, "c2")
	// Wait until the overlay carries traffic both ways.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err1 := h1.Docker("exec", "c1", "ping", "-c", "1", "-W", "1", x.ip2)
		_, err2 := h2.Docker("exec", "c2", "ping", "-c", "1", "-W", "1", x.ip1)
		if err1 == nil && err2 == nil {
			return x
		}
		if time.Now().After(deadline) {
			t.Fatalf("overlay not working after 30s: %v; %v", err1, err2)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// mtu is the MTU of container c1's overlay interface.
func (x *twoHosts) mtu(t *testing.T) string {
	t.Helper()
	return x.h1.MustDocker(t, "exec", "c1", "cat", "/sys/class/net/eth0/mtu")
}

// underlayMTU is the MTU of host 1's underlay interface.
func (x *twoHosts) underlayMTU(t *testing.T) string {
	t.Helper()
	out, err := x.h1.Exec("ip", "-o", "link", "show", x.h1.UnderlayDev)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(out)
	for i := range f[:len(f)-1] {
		if f[i] == "mtu" {
			return f[i+1]
		}
	}
	t.Fatalf("no mtu in %q", out)
	return ""
}

// TestBenchThroughput: iperf3 TCP between containers on two hosts over the
// overlay, against iperf3 between the two host namespaces over the underlay.
func TestBenchThroughput(t *testing.T) {
	needBench(t)
	rec := newRecorder(t, "throughput")
	x := newTwoHosts(t, "tput", "10.70.0.0/24")
	rec.res.Measures = "TCP throughput of one iperf3 stream (`iperf3 -c -t 2 -O 1`, the first second omitted) " +
		"from a container on host 1 to a container on host 2 across the plugin's overlay (VXLAN, container MTU " + x.mtu(t) + "). " +
		"iperf3 (the host's Debian binary) runs inside each container's network namespace by `nsenter --net=/proc/<pid>/ns/net`, " +
		"which is exactly the container's network path (veth, overlay bridge, VXLAN, underlay)."
	rec.res.Baseline = "the same iperf3 between the two hosts' own network namespaces directly over the underlay " +
		"(veth to the harness's switch bridge, MTU " + x.underlayMTU(t) + "): the limit of this machine's path."

	cases := x.comparisons(t)
	samples := make([][]float64, len(cases))
	var under []float64
	for i := range Runs {
		var line []string
		for ci, c := range cases {
			if c.Unavailable != "" {
				continue
			}
			v, err := iperf(c.NS2, c.NS1, c.IP2)
			if err != nil {
				t.Fatalf("run %d, %s: %v", i+1, c.Name, err)
			}
			samples[ci] = append(samples[ci], v)
			line = append(line, fmt.Sprintf("%s %.2f", c.Name, v))
		}
		v, err := iperf(x.hostNS2, x.hostNS1, x.underlay2)
		if err != nil {
			t.Fatalf("run %d, underlay: %v", i+1, err)
		}
		under = append(under, v)
		t.Logf("run %d (Gbit/s): %s; underlay %.2f", i+1, strings.Join(line, ", "), v)
	}
	rec.res.Rows = append(rec.res.Rows, compareRows(cases, samples, under, "container to container, ", "Gbit/s", "Throughput, Gbit/s")...)
	rec.note("%s", encryptionNote())
	rec.note("Docker's own overlay driver: the same two hosts in swarm mode, an attachable `docker network create -d overlay` network, containers started with docker run; its rows have the same underlay baseline and are not drawn in the chart. %s",
		compareNote(cases, samples, "throughput"))
	// encap=gre: measured where the kernel has gretap, reported otherwise.
	greRow := Row{Name: "container to container, overlay (encap=gre)", Unit: "Gbit/s"}
	if err := overlay.Available(overlay.EncapGRE); err != nil {
		greRow.Unavailable = "not available on this kernel (" + err.Error() + "); measured on Debian's kernel in the test guest: section 9"
		_, cerr := x.h1.Docker("network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", "10.71.0.0/24", "-o", "overlay=tputgre", "-o", "encap=gre", "tputgre")
		if cerr == nil {
			t.Errorf("the kernel has no gretap but the plugin created an encap=gre network")
		} else {
			rec.note("encap=gre: the kernel has no gretap device type, and the plugin refuses such a network: `docker network create -o encap=gre` fails with: %s",
				oneLine(lastPart(cerr.Error())))
		}
	} else {
		var gre, under []float64
		for _, h := range x.c.Hosts {
			overlayNetwork(t, h, "tputgre", "10.71.0.0/24", "-o", "encap=gre")
		}
		runContainer(t, x.h1, "ga", "tputgre")
		g2 := runContainer(t, x.h2, "gb", "tputgre")
		gns1, gns2 := containerNetNS(t, x.h1, "ga"), containerNetNS(t, x.h2, "gb")
		for i := range Runs {
			v, err := iperf(gns2, gns1, g2)
			if err != nil {
				t.Fatalf("run %d, overlay gre: %v", i+1, err)
			}
			gre = append(gre, v)
			v, err = iperf(x.hostNS2, x.hostNS1, x.underlay2)
			if err != nil {
				t.Fatalf("run %d, underlay: %v", i+1, err)
			}
			under = append(under, v)
		}
		greRow.Samples, greRow.BaseName, greRow.Base = gre, "host to host, underlay", under
		greRow.Chart = "Throughput, Gbit/s"
	}
	rec.res.Rows = append(rec.res.Rows, greRow)
	rec.note("Cases alternate run by run (each overlay, then the underlay). One TCP stream; sender and receiver share the machine's %d cores, so the numbers are CPU-bound, not link-bound.", numCPU())
	rec.note("Store: etcd on the underlay; the store is not on the data path.")
	rec.save()
}

// iperf runs an iperf3 server in serverNS and a client in clientNS against
// addr and returns the received rate in Gbit/s.
func iperf(serverNS, clientNS, addr string) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	srv := exec.CommandContext(ctx, "nsenter", "--net="+serverNS, "--", "iperf3", "-s", "-p", "5201")
	srv.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := srv.Start(); err != nil {
		return 0, fmt.Errorf("start iperf3 server: %w", err)
	}
	defer func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
	}()
	type report struct {
		Error string `json:"error"`
		End   struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	var r report
	for try := 0; ; try++ {
		cli := exec.CommandContext(ctx, "nsenter", "--net="+clientNS, "--", "iperf3", "-c", addr, "-p", "5201", "-t", "2", "-O", "1", "-J")
		out, err := cli.Output()
		r = report{}
		if jerr := json.Unmarshal(out, &r); jerr != nil {
			return 0, fmt.Errorf("iperf3 -c %s: %v (output %q): %v", addr, err, lastBytes(string(out), 300), jerr)
		}
		if strings.Contains(r.Error, "unable to connect") && try < 30 {
			time.Sleep(100 * time.Millisecond) // the server is not listening yet
			continue
		}
		if r.Error != "" || err != nil {
			return 0, fmt.Errorf("iperf3 -c %s: %v: %s", addr, err, r.Error)
		}
		break
	}
	if r.End.SumReceived.BitsPerSecond <= 0 {
		return 0, errors.New("iperf3 reported no data received")
	}
	return r.End.SumReceived.BitsPerSecond / 1e9, nil
}

// TestBenchLatency: ping RTT and TCP request/response rate, container to
// container over the overlay against host to host over the underlay.
func TestBenchLatency(t *testing.T) {
	needBench(t)
	rec := newRecorder(t, "latency")
	rec.res.Measures = "(a) ping round-trip time: busybox `ping -q -c 100 -i 0.01` run in a container on host 1 " +
		"(`docker exec`) to a container on host 2 over the overlay; one run = the average RTT of its 100 echoes. " +
		"(b) TCP request/response rate: 1-byte request, 1-byte answer, one connection, as many as fit in 2 s " +
		"(a small Go client and echo server in the two containers' network namespaces, like netperf TCP_RR)."
	rec.res.Baseline = "the same ping (busybox, in host 1's namespace) and the same TCP client/server between " +
		"the two hosts' own namespaces over the underlay."
	x := newTwoHosts(t, "lat", "10.72.0.0/24")

	pingRE := regexp.MustCompile(`min/avg/max = ([0-9.]+)/([0-9.]+)/([0-9.]+) ms`)
	avgRTT := func(out string) (float64, error) {
		m := pingRE.FindStringSubmatch(out)
		if m == nil {
			return 0, fmt.Errorf("no round-trip summary in ping output %q", out)
		}
		v, err := strconv.ParseFloat(m[2], 64)
		return v * 1000, err // microseconds
	}
	pingArgs := []string{"ping", "-q", "-c", "100", "-i", "0.01", "-W", "2"}
	// Warm the neighbour caches first.
	x.h1.Docker(append([]string{"exec", "c1"}, "ping", "-c", "2", x.ip2)...)
	x.h1.Exec("busybox", "ping", "-c", "2", x.underlay2)

	cases := x.comparisons(t)
	for _, c := range cases[1:] {
		if c.Unavailable == "" {
			x.h1.Docker("exec", c.Container1, "ping", "-c", "2", c.IP2)
		}
	}
	pings, rrs := make([][]float64, len(cases)), make([][]float64, len(cases))
	var pUnder, rUnder []float64
	for i := range Runs {
		var line []string
		for ci, c := range cases {
			if c.Unavailable != "" {
				continue
			}
			out, err := x.h1.Docker(append(append([]string{"exec", c.Container1}, pingArgs...), c.IP2)...)
			if err != nil {
				t.Fatalf("run %d: %s ping: %v", i+1, c.Name, err)
			}
			v, err := avgRTT(out)
			if err != nil {
				t.Fatal(err)
			}
			pings[ci] = append(pings[ci], v)
			rate, err := tcpRR(c.NS2, c.NS1, c.IP2, 2*time.Second)
			if err != nil {
				t.Fatalf("run %d: %s: %v", i+1, c.Name, err)
			}
			rrs[ci] = append(rrs[ci], rate/1000)
			line = append(line, fmt.Sprintf("%s %.0f µs %.1f k/s", c.Name, v, rate/1000))
		}
		out, err := x.h1.Exec(append(append([]string{"busybox"}, pingArgs...), x.underlay2)...)
		if err != nil {
			t.Fatalf("run %d: underlay ping: %v", i+1, err)
		}
		v, err := avgRTT(out)
		if err != nil {
			t.Fatal(err)
		}
		pUnder = append(pUnder, v)
		rate, err := tcpRR(x.hostNS2, x.hostNS1, x.underlay2, 2*time.Second)
		if err != nil {
			t.Fatalf("run %d: underlay: %v", i+1, err)
		}
		rUnder = append(rUnder, rate/1000)
		t.Logf("run %d: %s; underlay %.0f µs %.1f k/s", i+1, strings.Join(line, ", "), v, rate/1000)
	}
	rec.res.Rows = append(compareRows(cases, pings, pUnder, "ping RTT, container to container, ", "µs", "Ping RTT, microseconds"),
		compareRows(cases, rrs, rUnder, "TCP request/response, container to container, ", "1000 transactions/s", "TCP request/response, 1000/s")...)
	rec.note("%s", encryptionNote())
	rec.note("Docker's own overlay driver: the same two hosts in swarm mode, an attachable overlay network; its rows have the same underlay baseline and are not drawn in the chart. %s %s",
		compareNote(cases, pings, "ping RTT"), compareNote(cases, rrs, "request/response rate"))
	rec.note("Lower is better for RTT, higher for the request/response rate. The two cases alternate run by run.")
	rec.save()
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

// lastPart drops the command line from a harness error ("cmd args: exit
// status 1: message").
func lastPart(s string) string {
	if i := strings.LastIndex(s, "exit status "); i >= 0 {
		if j := strings.Index(s[i:], ": "); j >= 0 {
			return s[i+j+2:]
		}
	}
	return s
}
