package bench

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/simhosts"
	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// The stores the control-plane benchmarks (scale, churn) run on: etcd and
// Consul. (ZooKeeper's default 1 MB packet limit refuses the list of
// 100,000 children of one directory.)
var controlStores = []string{"etcd", "consul"}

// onEachStore runs rows as a subtest per store of controlStores and adds
// what each returns to the section; a store whose run failed leaves a note.
func onEachStore(t *testing.T, rec *recorder, rows func(t *testing.T, kind string) []Row) {
	for _, kind := range controlStores {
		ok := t.Run(kind, func(t *testing.T) {
			rec.res.Rows = append(rec.res.Rows, rows(t, kind)...)
		})
		if !ok {
			rec.note("%s: the benchmark failed (see the log); the rows it did not finish are missing.", kind)
		}
	}
}

// Simulated remote hosts: this many live host keys, their endpoints spread
// over them round robin.
const simHosts = 100

// The overlay subnet of the control-plane benchmarks, and the offset of the
// first simulated endpoint's address in it (below it: the real containers).
const (
	simSubnet = "10.64.0.0/14"
	simOffset = 4096
)

// The scale benchmark's sizes and runs.
const (
	scaleSmall     = 10_000
	scaleLarge     = 100_000
	scaleRunsLarge = 2 // cold starts at scaleLarge (Runs at the others)
	// changesPerRun: after each cold start, this many endpoints are added
	// and removed again one at a time, each add and each remove one sample
	// of "one change".
	changesPerRun = 3
)

// quick is DNP_BENCH_QUICK=1: the control-plane benchmarks at a tenth of
// their sizes and durations, to try them out.
func quick() bool { return os.Getenv("DNP_BENCH_QUICK") == "1" }

// quickNote marks the results of a quick run.
const quickNote = "QUICK RUN (DNP_BENCH_QUICK=1): sizes, runs and durations cut to a tenth or less; not the benchmark's numbers."

// simFleet is the simulated hosts, on the underlay subnet of c (.100 to
// .199, where no real host or node is), holding endpoints on overlay.
func simFleet(t *testing.T, c *benchCluster, st store.Store, overlayName string) *simhosts.Fleet {
	t.Helper()
	under, err := netip.ParsePrefix(c.Subnet)
	if err != nil {
		t.Fatal(err)
	}
	f := &simhosts.Fleet{Store: st, Overlay: overlayName, Subnet: netip.MustParsePrefix(simSubnet), Offset: simOffset}
	for i := range simHosts {
		b := under.Addr().As4()
		b[3] = byte(100 + i)
		f.Hosts = append(f.Hosts, netip.AddrFrom4(b))
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.RegisterHosts(ctx); err != nil {
		t.Fatal(err)
	}
	return f
}

// openStore opens a client of the cluster's store, closed when t ends.
func openStore(t *testing.T, c *benchCluster) store.Store {
	t.Helper()
	st, err := stores.Open(context.Background(), store.Config{URL: c.StoreURL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// TestBenchScale: time and plugin memory to program 10,000 and 100,000
// remote endpoints on one host from a cold start, and the time one change
// takes with 0, 10,000 and 100,000 programmed; on etcd and Consul.
func TestBenchScale(t *testing.T) {
	needBench(t)
	sizes, runsLarge := []int{scaleSmall, scaleLarge}, scaleRunsLarge
	runs := Runs
	if quick() {
		sizes, runs, runsLarge = []int{scaleSmall / 10, scaleLarge / 10}, 2, 1
	}
	rec := newRecorder(t, "scale")
	rec.res.Measures = fmt.Sprintf("one Docker host runs the plugin with one local container on an overlay; remote hosts "+
		"are simulated as store records: %d live host keys and N endpoint records spread over them, written as remote "+
		"plugins would. Each store (%s) has a cluster of its own; the rows say which. "+
		"Program time, from a cold start: with the N records already in the store, the plugin is stopped, every peer "+
		"entry of the overlay is deleted from the kernel (neighbour, VXLAN forwarding and bridge entries), and the "+
		"plugin is started again; the time runs from starting the plugin process until the overlay namespace holds "+
		"all N permanent neighbour entries (polled every 20 ms, at 100,000 every 100 ms). "+
		"RSS: the plugin's VmRSS 1 s after that. One change: after each cold start %d endpoints are added and removed "+
		"again one at a time, each write timed until its neighbour entry appears or is gone (netlink events); adds "+
		"and removes are both samples. %d cold starts at 0 and %s endpoints, %d at %s (each takes long).",
		simHosts, strings.Join(controlStores, ", "), changesPerRun, runs, formatCount(sizes[0]), runsLarge, formatCount(sizes[1]))
	rec.res.Baseline = "program time: the same N peers written by one direct call of the data plane " +
		"(package overlay, SetPeers) into an empty scratch overlay on the same host, without store or watch: " +
		"the kernel's share. RSS and one change: the same cold start with no remote endpoint."
	if quick() {
		rec.note(quickNote)
	}
	onEachStore(t, rec, func(t *testing.T, kind string) []Row { return scaleOn(t, rec, kind, sizes, runs, runsLarge) })
	rec.note("Each remote endpoint is three kernel entries: a VXLAN forwarding entry (MAC to remote host), a static bridge "+
		"entry and a permanent neighbour entry; plus one all-zero forwarding entry per remote host (%d).", simHosts)
	rec.note("Every change waits for the plugin's short debounce of store events (20 ms, driver/sync.go) before it is programmed, then applied as a delta, without reading the kernel tables (docs/scale.md). What Consul adds is its watch: every change returns the whole directory (docs/stores.md, \"At scale\").")
	rec.save()
}

// scaleOn measures the scale rows on a one-host cluster with a store of kind.
func scaleOn(t *testing.T, rec *recorder, kind string, sizes []int, runs, runsLarge int) []Row {
	c := newClusterOn(t, 1, kind, harness.Options{})
	h := c.Hosts[0]
	plugin := c.Plugins[0]
	overlayNetwork(t, h, "scale", simSubnet)
	runContainer(t, h, "local", "scale")
	nsPath := overlayNS(t, c.Cluster, h)
	kernel, err := simhosts.OpenKernel(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kernel.Close)
	st := openStore(t, c)
	fleet := simFleet(t, c, st, "scale")
	ctx := context.Background()

	// The scratch overlay for the direct data-plane baseline.
	direct := &overlay.Host{NetNS: h.NetNS, Prefix: c.Prefix + "-b1-"}
	ovn, err := direct.EnsureNetwork(overlay.NetworkConfig{ID: "1", VNI: 99, Encap: overlay.EncapVXLAN,
		LocalIP: netip.MustParseAddr(h.UnderlayIP)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := direct.DeleteNetwork("1"); err != nil {
			t.Errorf("remove scratch overlay: %v", err)
		}
	})

	stored := 0 // simulated endpoints 0..stored-1 are in the store
	setStored := func(n int) error {
		if n < stored {
			if _, err := fleet.RemoveAll(ctx); err != nil {
				return err
			}
			stored = 0
		}
		if n > stored {
			if err := fleet.AddRange(ctx, stored, n); err != nil {
				return err
			}
			stored = n
		}
		return nil
	}
	// coldStart restarts the plugin on an empty kernel with n endpoints in
	// the store and returns the time until all n are programmed.
	coldStart := func(n int) (time.Duration, error) {
		plugin.Stop()
		if err := setStored(n); err != nil {
			return 0, err
		}
		if err := kernel.FlushPeers(); err != nil {
			return 0, err
		}
		if left, err := kernel.CountNeighbours(); err != nil || left != 0 {
			return 0, fmt.Errorf("%d neighbour entries left after the flush (%v)", left, err)
		}
		start := time.Now()
		plugin.Start(t)
		every := 20 * time.Millisecond
		if n > 50_000 {
			every = 100 * time.Millisecond // a dump of that many costs the CPU the plugin needs
		}
		at, err := kernel.WaitCount(n, every, 10*time.Minute)
		if err != nil {
			return 0, err
		}
		return at.Sub(start), nil
	}
	// changes adds and removes endpoints n, n+1, ... one at a time.
	changes := func(n int) ([]float64, error) {
		mon, err := simhosts.StartMonitor(nsPath)
		if err != nil {
			return nil, err
		}
		defer mon.Close()
		var out []float64
		for k := range changesPerRun {
			i := n + k
			ip := fleet.Endpoint(i).IP
			start := time.Now()
			if err := fleet.Add(ctx, i); err != nil {
				return nil, err
			}
			at, err := mon.WaitAdded(ip, 2*time.Minute)
			if err != nil {
				return nil, fmt.Errorf("add: %w", err)
			}
			out = append(out, ms(at.Sub(start)))
			start = time.Now()
			if err := fleet.Remove(ctx, i); err != nil {
				return nil, err
			}
			at, err = mon.WaitRemoved(ip, 2*time.Minute)
			if err != nil {
				return nil, fmt.Errorf("remove: %w", err)
			}
			out = append(out, ms(at.Sub(start)))
		}
		return out, nil
	}
	rss := func() float64 {
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", plugin.Pid())); err != nil || filepath.Base(exe) != "docker-net-plugin" {
			t.Fatalf("pid %d is not the plugin (exe %q, %v)", plugin.Pid(), exe, err)
		}
		v, err := rssMiB(plugin.Pid())
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	// The baselines with no remote endpoint.
	var idleRSS, change0 []float64
	for run := range runs {
		if _, err := coldStart(0); err != nil {
			t.Fatalf("size 0 run %d: %v", run+1, err)
		}
		time.Sleep(time.Second)
		idleRSS = append(idleRSS, rss())
		v, err := changes(0)
		if err != nil {
			t.Fatalf("size 0 run %d: one change: %v", run+1, err)
		}
		change0 = append(change0, v...)
		t.Logf("%s, size 0 run %d: RSS %.1f MiB; one change %s ms", kind, run+1, idleRSS[run], fmtList(v))
	}

	var rows []Row
	for si, n := range sizes {
		r := runs
		if si == len(sizes)-1 {
			r = runsLarge
		}
		var prog, base, mem, change []float64
		peers := make([]overlay.Peer, n)
		for i := range n {
			e := fleet.Endpoint(i)
			peers[i] = overlay.Peer{HostIP: e.Host, MAC: e.MAC, IPs: []netip.Addr{e.IP}}
		}
		for run := range r {
			d, err := coldStart(n)
			if err != nil {
				t.Fatalf("size %d run %d: cold start: %v", n, run+1, err)
			}
			prog = append(prog, d.Seconds())
			if run == 0 {
				// The forwarding entries are there too: one per endpoint
				// and one all-zero entry per remote host.
				if fdb, err := kernel.CountFDB(); err != nil || fdb != n+simHosts {
					t.Errorf("size %d: %d VXLAN forwarding entries (%v), want %d", n, fdb, err, n+simHosts)
				}
			}
			time.Sleep(time.Second)
			mem = append(mem, rss())
			v, err := changes(n)
			if err != nil {
				t.Fatalf("size %d run %d: one change: %v", n, run+1, err)
			}
			change = append(change, v...)

			dd, err := timed(func() error { _, err := ovn.SetPeers(peers, nil); return err })
			if err != nil {
				t.Fatalf("size %d run %d: direct SetPeers: %v", n, run+1, err)
			}
			base = append(base, dd.Seconds())
			if _, err := ovn.SetPeers(nil, nil); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s, size %d run %d: cold start programmed in %.2f s, direct %.2f s; RSS %.1f MiB; one change %s ms",
				kind, n, run+1, prog[run], base[run], mem[run], fmtList(v))
		}
		label := formatCount(n)
		rows = append(rows,
			Row{Name: kind + ": program " + label + " remote endpoints, cold start", Unit: "s", Samples: prog,
				BaseName: "direct SetPeers of the same " + label, Base: base},
			Row{Name: kind + ": plugin RSS with " + label + " remote endpoints", Unit: "MiB", Samples: mem,
				BaseName: "plugin RSS, none", Base: idleRSS},
			Row{Name: kind + ": one change applied with " + label + " programmed", Unit: "ms", Samples: change,
				BaseName: "one change, none programmed", Base: change0},
		)
	}
	return rows
}

// fmtList prints samples for a log line.
func fmtList(v []float64) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = FormatNumber(x)
	}
	return strings.Join(s, " ")
}

func formatCount(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// rssMiB is the resident set size of process pid.
func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest) // "12345 kB"
			kb, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS %q: %w", rest, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
