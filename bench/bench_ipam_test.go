package bench

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	ipamapi "github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// ipamHosts is how many hosts allocate at once.
const ipamHosts = 3

// ipamPhase is how long each rate is measured in one run.
const ipamPhase = time.Second

// TestBenchIPAM: addresses allocated per second by three concurrent hosts
// against each store, next to the raw compare-and-swap rate of that store.
func TestBenchIPAM(t *testing.T) {
	needBench(t)
	rec := newRecorder(t, "ipam")
	rec.res.Measures = fmt.Sprintf("%d IPAM drivers (package ipam, as the plugin runs it), each with its own store client "+
		"like %d hosts, call RequestAddress on one shared /16 pool as fast as they can for %s; the rate is the total of "+
		"addresses handed out (all checked to be distinct) per second.", ipamHosts, ipamHosts, ipamPhase)
	rec.res.Baseline = fmt.Sprintf("the raw compare-and-swap rate of the same store from the same program: %d clients, "+
		"each updating its own key by CompareAndSwap in a loop for %s (no contention: the store's limit). "+
		"Alternates with the IPAM phase run by run.", ipamHosts, ipamPhase)

	kinds := []string{"bolt", "etcd", "consul", "zk"}
	for _, kind := range kinds {
		// A subtest per store, so each server stops before the next starts.
		t.Run(kind, func(t *testing.T) {
			url := startStore(t, kind)
			var alloc, cas []float64
			for run := range Runs {
				prefix := fmt.Sprintf("bench-%d", run)
				v, err := casRate(url(prefix + "-cas"))
				if err != nil {
					t.Fatalf("run %d: CAS: %v", run+1, err)
				}
				cas = append(cas, v)
				v, err = allocRate(t, url(prefix+"-ipam"))
				if err != nil {
					t.Fatalf("run %d: IPAM: %v", run+1, err)
				}
				alloc = append(alloc, v)
				t.Logf("run %d: IPAM %.0f addresses/s, CAS %.0f/s", run+1, alloc[run], cas[run])
			}
			rec.res.Rows = append(rec.res.Rows, Row{
				Name: fmt.Sprintf("%s: addresses allocated, %d hosts", kind, ipamHosts), Unit: "per second", Samples: alloc,
				BaseName: fmt.Sprintf("%s: raw CAS, %d clients", kind, ipamHosts), Base: cas,
			})
		})
	}
	if t.Failed() {
		return
	}
	rec.note("Servers: one etcd, one Consul server agent and one ZooKeeper, each started by internal/testenv on loopback with its data on disk. " +
		"bolt is the embedded single-host store: its \"hosts\" are three clients of one file in this process, serialised by the file lock.")
	rec.note("A dynamic allocation is one transaction (create the address key, move the pool's hint): about one compare-and-swap " +
		"round trip, plus more when hosts collide, so the raw CAS rate is its expected limit.")
	rec.save()
}

// startStore starts a server of kind on loopback (bolt: a directory) and
// returns a function giving a store URL under a prefix.
func startStore(t *testing.T, kind string) func(prefix string) string {
	t.Helper()
	if kind == "bolt" {
		dir := t.TempDir()
		return func(prefix string) string { return "bolt://" + filepath.Join(dir, prefix+".db") }
	}
	return testenv.StartServer(t, kind, testenv.ServerOptions{}).URL
}

// openClients opens n clients of the store at url.
func openClients(url string, n int) ([]store.Store, func(), error) {
	var out []store.Store
	closeAll := func() {
		for _, s := range out {
			s.Close()
		}
	}
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s, err := stores.Open(ctx, store.Config{URL: url})
		cancel()
		if err != nil {
			closeAll()
			return nil, nil, fmt.Errorf("open %s: %w", url, err)
		}
		out = append(out, s)
	}
	return out, closeAll, nil
}

// casRate runs ipamHosts clients, each compare-and-swapping its own key
// for ipamPhase, and returns the total successful writes per second.
func casRate(url string) (float64, error) {
	clients, closeAll, err := openClients(url, ipamHosts)
	if err != nil {
		return 0, err
	}
	defer closeAll()
	counts := make([]int, len(clients))
	errs := make([]error, len(clients))
	var ready, wg sync.WaitGroup
	ready.Add(len(clients))
	start := make(chan struct{})
	for i, s := range clients {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), ipamPhase+30*time.Second)
			defer cancel()
			key := fmt.Sprintf("bench/cas/c%d", i)
			ver, err := s.CompareAndSwap(ctx, key, []byte("0"), 0)
			ready.Done()
			if err != nil {
				errs[i] = err
				return
			}
			<-start
			end := time.Now().Add(ipamPhase)
			for time.Now().Before(end) {
				ver, err = s.CompareAndSwap(ctx, key, []byte(fmt.Sprint(counts[i])), ver)
				if err != nil {
					errs[i] = fmt.Errorf("client %d: %w", i, err)
					return
				}
				counts[i]++
			}
		})
	}
	ready.Wait()
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	total := 0
	for _, n := range counts {
		total += n
	}
	return float64(total) / elapsed.Seconds(), nil
}

// allocRate runs ipamHosts IPAM drivers allocating from one shared pool
// for ipamPhase and returns the addresses handed out per second. It fails
// if any address was handed out twice.
func allocRate(t *testing.T, url string) (float64, error) {
	clients, closeAll, err := openClients(url, ipamHosts)
	if err != nil {
		return 0, err
	}
	defer closeAll()
	var drivers []*ipam.Driver
	var poolID string
	for i, s := range clients {
		d := ipam.New(s, ipam.Options{HostID: fmt.Sprintf("bench-host-%d", i+1)})
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, err := d.RequestPool(ctx, &ipamapi.RequestPoolRequest{AddressSpace: ipam.LocalSpace, Pool: "10.80.0.0/16"})
		cancel()
		if err != nil {
			return 0, fmt.Errorf("host %d: request pool: %w", i+1, err)
		}
		if poolID != "" && resp.PoolID != poolID {
			return 0, fmt.Errorf("hosts got different pools: %s and %s", poolID, resp.PoolID)
		}
		poolID = resp.PoolID
		drivers = append(drivers, d)
	}
	got := make([][]string, len(drivers))
	errs := make([]error, len(drivers))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, d := range drivers {
		wg.Go(func() {
			<-start
			end := time.Now().Add(ipamPhase)
			for time.Now().Before(end) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				resp, err := d.RequestAddress(ctx, &ipamapi.RequestAddressRequest{PoolID: poolID})
				cancel()
				if err != nil {
					errs[i] = fmt.Errorf("host %d: %w", i+1, err)
					return
				}
				got[i] = append(got[i], resp.Address)
			}
		})
	}
	t0 := time.Now()
	close(start)
	wg.Wait()
	elapsed := time.Since(t0)
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	seen := map[string]int{}
	total := 0
	for i, list := range got {
		for _, a := range list {
			if other, dup := seen[a]; dup {
				t.Errorf("address %s handed out to host %d and host %d", a, other+1, i+1)
			}
			seen[a] = i
			total++
		}
	}
	return float64(total) / elapsed.Seconds(), nil
}
