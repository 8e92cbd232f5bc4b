package bench

import (
	"context"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"sort"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/simhosts"
)

// The churn benchmark (issue 18): this many store writes a second, adds
// and removes of simulated endpoints, for this long, while this many
// other remote endpoints are programmed.
const (
	churnRate       = 200
	churnDuration   = 60 * time.Second
	churnBackground = 10_000
	// churnKeep churn endpoints exist at once: after the first second of
	// adds, each add comes with the removal of the oldest one (which has
	// then lived about 2 s).
	churnKeep = 200
	// churnFirst is the index of the first churn endpoint: their
	// addresses are apart from the background's.
	churnFirst = 200_000
	// churnWindow: latency growth compares the changes written in the
	// first and in the last this long.
	churnWindow = 10 * time.Second
	// churnSettle bounds the wait for the kernels to match the store after
	// the churn.
	churnSettle = 2 * time.Minute
)

// TestBenchChurn: three real hosts with a container each on one overlay,
// 10,000 simulated remote endpoints programmed, then 200 adds and removes
// of simulated endpoints a second for 60 s; the time from each store write
// until every host's kernel shows it, on etcd and Consul.
func TestBenchChurn(t *testing.T) {
	needBench(t)
	rate, duration, background := churnRate, churnDuration, churnBackground
	if quick() {
		duration, background = churnDuration/6, churnBackground/10
	}
	rec := newRecorder(t, "churn")
	rec.res.Percentiles = true
	rec.res.Measures = fmt.Sprintf("three Docker hosts run the plugin, each with one container on one overlay; %d simulated "+
		"remote hosts hold %s endpoint records, programmed on every host before the churn starts. Churn: for %s, %d store "+
		"writes a second on a fixed schedule, each adding or removing one simulated endpoint record (spread over the "+
		"simulated hosts; up to %d exist at once, then every add comes with the removal of the oldest). On each real host a "+
		"netlink monitor in the overlay namespace timestamps when each endpoint's permanent neighbour entry appears or "+
		"is deleted. Latency: from sending the store write until the entry appears (add) or is gone (remove), every "+
		"change on every host (the samples). Growth: the median latency of the changes written in the last %s over "+
		"that of the first %s. Missed: changes whose event never came on some host (counted per host; a churn endpoint lives about %s, so a host further behind than that may skip its add and remove altogether). Left over: "+
		"after the churn the remaining churn endpoints are removed, and once the kernels settle (at most %s) the "+
		"entries that differ between each host's kernel and the store, summed over the hosts. Last applied: from the "+
		"last churn write until the last event it caused. Each store (etcd, Consul) has a cluster of its own.",
		simHosts, formatCount(background), duration, rate, churnKeep, churnWindow, churnWindow,
		time.Duration(churnKeep)*time.Second/time.Duration(rate/2), churnSettle)
	rec.res.Baseline = "the same churn, on the same hosts just before, with no background endpoints."
	if quick() {
		rec.note(quickNote)
	}
	onEachStore(t, rec, func(t *testing.T, kind string) []Row { return churnOn(t, rec, kind, rate, duration, background) })
	rec.save()
}

// churnResult is what one churn run measured.
type churnResult struct {
	latency     []float64 // ms, every change on every host that arrived
	growth      float64   // p50 of the last window over the first
	changes     int       // writes
	missed      int       // (change, host) pairs without an event
	left        int       // kernel entries differing from the store at the end
	lastApplied float64   // ms from the last write to the last event
	rate        float64   // writes per second achieved
	problems    []string  // what did not converge
}

func churnOn(t *testing.T, rec *recorder, kind string, rate int, duration time.Duration, background int) []Row {
	c := newClusterOn(t, 3, kind, harness.Options{})
	for _, h := range c.Hosts {
		overlayNetwork(t, h, "churn", simSubnet)
		runContainer(t, h, "c-"+h.Name, "churn")
	}
	var hosts []simhosts.Host
	var nsPaths []string
	for _, h := range c.Hosts {
		ns := overlayNS(t, c.Cluster, h)
		k, err := simhosts.OpenKernel(ns)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(k.Close)
		hosts = append(hosts, simhosts.Host{Name: h.Name, Addr: netip.MustParseAddr(h.UnderlayIP), Kernel: k})
		nsPaths = append(nsPaths, ns)
	}
	st := openStore(t, c)
	fleet := simFleet(t, c, st, "churn")
	ctx := context.Background()
	if _, err := fleet.WaitConverged(ctx, hosts, 100*time.Millisecond, time.Minute); err != nil {
		t.Fatalf("before the churn: %v", err)
	}

	first := churnFirst
	run := func(what string) churnResult {
		r, err := churnRun(ctx, fleet, hosts, nsPaths, first, rate, duration)
		if err != nil {
			t.Fatalf("%s, %s: %v", kind, what, err)
		}
		first += r.changes
		for _, p := range r.problems {
			t.Errorf("%s, %s: %s", kind, what, p)
			rec.note("%s, %s: %s", kind, what, p)
		}
		t.Logf("%s, %s: %d writes at %.0f/s; latency p50 %.1f ms, p99 %.1f ms, max %.1f ms; growth %.2fx; "+
			"%d missed, %d left over; last applied %.0f ms after the last write",
			kind, what, r.changes, r.rate, Percentile(sorted(r.latency), 50), Percentile(sorted(r.latency), 99),
			Summarize(r.latency).Max, r.growth, r.missed, r.left, r.lastApplied)
		return r
	}
	base := run("no background endpoints")

	start := time.Now()
	if err := fleet.AddRange(ctx, 0, background); err != nil {
		t.Fatal(err)
	}
	if _, err := fleet.WaitConverged(ctx, hosts, 100*time.Millisecond, 5*time.Minute); err != nil {
		t.Fatalf("programming the background: %v", err)
	}
	t.Logf("%s: %s background endpoints programmed on %d hosts in %s", kind, formatCount(background), len(hosts),
		time.Since(start).Round(time.Millisecond))
	full := run(formatCount(background) + " background endpoints")

	label := formatCount(background)
	rec.note("%s: %d and %d writes (%.0f/s and %.0f/s achieved) by 3 hosts: %d and %d latency samples.", kind,
		full.changes, base.changes, full.rate, base.rate, len(full.latency), len(base.latency))
	one := func(v float64) []float64 { return []float64{v} }
	return []Row{
		{Name: kind + ": churn with " + label + " programmed, store write to kernel entry", Unit: "ms",
			Samples: full.latency, BaseName: "the same churn, none programmed", Base: base.latency},
		{Name: kind + ": churn, p50 of the last " + churnWindow.String() + " over the first", Unit: "ratio",
			Samples: one(full.growth), BaseName: "the same, none programmed", Base: one(base.growth)},
		{Name: kind + ": churn, changes that never reached a host's kernel", Unit: "changes × hosts",
			Samples: one(float64(full.missed)), BaseName: "the same, none programmed", Base: one(float64(base.missed))},
		{Name: kind + ": churn, kernel entries left over at the end (kernel vs store)", Unit: "entries",
			Samples: one(float64(full.left)), BaseName: "the same, none programmed", Base: one(float64(base.left))},
		{Name: kind + ": churn, last change applied after the last write", Unit: "ms",
			Samples: one(full.lastApplied), BaseName: "the same, none programmed", Base: one(base.lastApplied)},
	}
}

// churnRun runs one churn from endpoint first on and measures it; the
// churn endpoints still there at the end are removed again.
func churnRun(ctx context.Context, fleet *simhosts.Fleet, hosts []simhosts.Host, nsPaths []string, first, rate int,
	duration time.Duration) (churnResult, error) {
	var r churnResult
	var mons []*simhosts.Monitor
	defer func() {
		for _, m := range mons {
			m.Close()
		}
	}()
	for _, ns := range nsPaths {
		m, err := simhosts.StartMonitor(ns)
		if err != nil {
			return r, err
		}
		mons = append(mons, m)
	}
	start := time.Now()
	changes, live, err := fleet.Churn(ctx, first, rate, duration, churnKeep)
	if err != nil {
		return r, err
	}
	elapsed := time.Since(start)
	r.changes = len(changes)
	r.rate = float64(len(changes)) / elapsed.Seconds()
	// Missed changes show as a difference here, and below as missing
	// events: a result, not a reason to stop.
	if _, err := fleet.WaitConverged(ctx, hosts, 100*time.Millisecond, churnSettle); err != nil {
		r.problems = append(r.problems, "after the churn: "+err.Error())
	}

	var firstWin, lastWin []float64
	lastWrite := simhosts.LastWrite(changes)
	var lastEvent time.Time
	for hi, m := range mons {
		if err := m.Err(); err != nil {
			return r, fmt.Errorf("%s: neighbour events lost: %w", hosts[hi].Name, err)
		}
		for _, c := range changes {
			at, ok := m.Added(c.IP)
			if !c.Add {
				at, ok = m.Removed(c.IP)
			}
			if !ok || at.Before(c.At) {
				r.missed++
				continue
			}
			lat := math.Round(ms(at.Sub(c.At))*1000) / 1000 // µs: the result file holds every sample
			r.latency = append(r.latency, lat)
			if c.At.Sub(start) < churnWindow {
				firstWin = append(firstWin, lat)
			}
			if lastWrite.Sub(c.At) < churnWindow {
				lastWin = append(lastWin, lat)
			}
			if at.After(lastEvent) {
				lastEvent = at
			}
		}
	}
	r.growth = Percentile(sorted(lastWin), 50) / Percentile(sorted(firstWin), 50)
	r.lastApplied = ms(lastEvent.Sub(lastWrite))

	// The end: the churn endpoints go, and nothing of them may stay.
	for _, i := range live {
		if err := fleet.Remove(ctx, i); err != nil {
			return r, err
		}
	}
	if _, err := fleet.WaitConverged(ctx, hosts, 100*time.Millisecond, churnSettle); err != nil {
		r.problems = append(r.problems, "after removing the churn endpoints: "+err.Error())
	}
	n, _, err := fleet.Compare(ctx, hosts)
	if err != nil {
		return r, err
	}
	r.left = n
	return r, nil
}

// sorted returns a sorted copy of v.
func sorted(v []float64) []float64 {
	s := slices.Clone(v)
	sort.Float64s(s)
	return s
}
