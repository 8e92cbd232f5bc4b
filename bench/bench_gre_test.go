package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/dockerhosts"

	"github.com/dnplabs/docker-net-plugin/guest"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// TestBenchGRE: iperf3 throughput over an encap=gre overlay against an
// encap=vxlan overlay between the same two containers' hosts, both on
// Debian's own kernel in the test guest (package guest), since the
// machines' kernel has no gretap. Run on the machine, it boots the guest,
// runs itself there and keeps the result the guest wrote.
func TestBenchGRE(t *testing.T) {
	needBench(t)
	if !guest.Inside() {
		benchInGuest(t, "gre")
		return
	}
	rec := newRecorder(t, "gre")
	c := newCluster(t, 2)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	for _, h := range c.Hosts {
		overlayNetwork(t, h, "tgre", "10.75.0.0/24", "-o", "encap=gre")
		overlayNetwork(t, h, "tvx", "10.76.0.0/24", "-o", "encap=vxlan")
	}
	type pair struct{ ns1, ns2, ip2 string }
	pairs := map[string]pair{}
	for _, n := range []string{"tgre", "tvx"} {
		runContainer(t, h1, n+"1", n)
		ip2 := runContainer(t, h2, n+"2", n)
		p := pair{ns1: containerNetNS(t, h1, n+"1"), ns2: containerNetNS(t, h2, n+"2"), ip2: ip2}
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, err := harness.ExecIn(p.ns1, "busybox", "ping", "-c", "1", "-W", "1", p.ip2)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("overlay %s not working after 30s: %v", n, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		pairs[n] = p
	}
	mtu := func(n string) string { // of container 1's eth0 (its /sys is not ours to read)
		out, err := harness.ExecIn(pairs[n].ns1, "ip", "-o", "link", "show", "dev", "eth0")
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
	rel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	rec.res.Measures = "TCP throughput of one iperf3 stream (`iperf3 -c -t 2 -O 1`) from a container on host 1 to a " +
		"container on host 2 across an encap=gre overlay (container MTU " + mtu("tgre") + "), measured in the test guest " +
		"(package guest: Debian 12's own kernel " + strings.TrimSpace(string(rel)) + " as User-mode Linux, one CPU; " +
		"the machines' own kernel has no gretap). Same method as section 1, inside the guest."
	rec.res.Baseline = "the same iperf3 between two containers of the same two hosts on an encap=vxlan overlay " +
		"(container MTU " + mtu("tvx") + ") in the same guest, alternating run by run; the VXLAN row's baseline is " +
		"the hosts' underlay in the guest."

	var gre, vx, under []float64
	for i := range Runs {
		for _, m := range []struct {
			name string
			out  *[]float64
			p    pair
		}{
			{"gre", &gre, pairs["tgre"]},
			{"vxlan", &vx, pairs["tvx"]},
			{"underlay", &under, pair{ns1: h1.NetNS, ns2: h2.NetNS, ip2: h2.UnderlayIP}},
		} {
			v, err := iperf(m.p.ns2, m.p.ns1, m.p.ip2)
			if err != nil {
				t.Fatalf("run %d, %s: %v", i+1, m.name, err)
			}
			*m.out = append(*m.out, v)
		}
		t.Logf("run %d: gre %.3f, vxlan %.3f, underlay %.3f Gbit/s", i+1, gre[i], vx[i], under[i])
	}
	rec.res.Rows = []Row{
		{Name: "container to container, encap=gre (guest)", Unit: "Gbit/s", Samples: gre,
			BaseName: "same hosts, encap=vxlan (guest)", Base: vx},
		{Name: "container to container, encap=vxlan (guest)", Unit: "Gbit/s", Samples: vx,
			BaseName: "host to host, underlay (guest)", Base: under},
	}
	rec.note("The guest is an emulated machine with one CPU that sender, receiver and both kernels' network paths share: " +
		"compare the rows of this section with each other (the ratio), not with section 1.")
	rec.save()
}

// benchInGuest boots the test guest, runs the calling benchmark in it and
// copies the result file (id.json) it wrote into this run's results.
func benchInGuest(t *testing.T, id string) {
	t.Helper()
	if err := guest.Available(); err != nil {
		testenv.Missing(t, "test guest: %v", err)
	}
	hostLoad, _ := os.ReadFile("/proc/loadavg")
	dir := t.TempDir()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	copyFile(t, self, filepath.Join(dir, "bench.test"))
	copyFile(t, harness.PluginBinary(t), filepath.Join(dir, "docker-net-plugin"))
	// The guest has no Go toolchain: the test image's multicast tool is built here.
	mcast, err := dockerhosts.BuildMcastTool()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "dnp-mcast"), mcast, 0o755); err != nil {
		t.Fatal(err)
	}
	env := []string{"DNP_BENCH=1", "DNP_BENCH_OUT=" + guest.JobDir + "/out", "DNP_PLUGIN_BIN=" + guest.JobDir + "/docker-net-plugin",
		dockerhosts.McastToolEnv + "=" + guest.JobDir + "/dnp-mcast"}
	if e := os.Getenv("DNP_DOCKER"); e != "" {
		env = append(env, "DNP_DOCKER="+e)
	}
	job := guest.Job{Dir: dir, Timeout: 20 * time.Minute, Steps: []guest.Step{{
		Name: "bench",
		Dir:  filepath.Join(guest.SourceDir(), "bench"),
		Env:  env,
		Args: []string{guest.JobDir + "/bench.test", "-test.v", "-test.count=1", "-test.timeout=15m",
			"-test.run", "^" + t.Name() + "$"},
	}}}
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	res, err := guest.Run(ctx, job)
	if err != nil {
		t.Fatalf("guest: %v", err)
	}
	s := res.Steps[0]
	t.Logf("guest: booted in %s, ran %s in %s (%s of host CPU); its output:\n%s",
		res.Boot.Round(10*time.Millisecond), t.Name(), s.Took.Round(time.Second), res.CPU.Round(time.Second), s.Output)
	if s.Code != 0 || guest.TestResults(s.Output)[t.Name()] != "PASS" {
		t.Fatalf("%s failed in the guest (exit %d)", t.Name(), s.Code)
	}
	b, err := os.ReadFile(filepath.Join(dir, "out", id+".json"))
	if err != nil {
		t.Fatalf("the guest wrote no result: %v", err)
	}
	var r Result
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	r.Notes = append(r.Notes, fmt.Sprintf("The machine's load average when the guest booted: %s (the guest's own is given below).",
		strings.Join(strings.Fields(string(hostLoad))[:3], " ")))
	if err := Save(outDir(), r); err != nil {
		t.Fatal(err)
	}
	t.Logf("saved %s/%s.json", outDir(), id)
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
