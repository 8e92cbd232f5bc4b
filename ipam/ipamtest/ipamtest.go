// Package ipamtest is the IPAM driver's test suite, written once and run
// against every store: the in-memory fake, the embedded bolt store and real
// etcd, Consul and ZooKeeper servers. Several "hosts" are several Drivers
// with different host ids, each with its own store client; the concurrency
// tests run them as goroutines and as separate OS processes.
package ipamtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	dnpipam "github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// Backend is the store the suite runs on.
type Backend struct {
	Name string
	// Open returns a new client of the store under namespace ns. Clients
	// opened with the same ns see the same data; different ns never meet.
	// Open registers the client's Close with t.Cleanup.
	Open func(t testing.TB, ns string) store.Store
	// URL is the store URL of namespace ns, for child processes; nil when
	// the store cannot be shared between processes (the in-memory fake).
	URL func(ns string) string
}

// Opener opens a store from a URL; child processes use it.
type Opener func(ctx context.Context, url string) (store.Store, error)

// Run runs the whole suite against b.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name string
		fn   func(t *testing.T, e *env)
	}{
		{"Capabilities", testCapabilities},
		{"PoolSharedAcrossHosts", testPoolShared},
		{"PoolRefCountedPerHost", testPoolRefCount},
		{"PoolOverlap", testOverlap},
		{"SubnetSharedByRanges", testSharedSubnet},
		{"BadInput", testBadInput},
		{"CarveDefaultPools", testCarve},
		{"GatewayIdempotentAcrossHosts", testGateway},
		{"GatewayExplicit", testGatewayExplicit},
		{"IPRange", testIPRange},
		{"ExplicitAddress", testExplicit},
		{"AuxAddressExclusive", testAuxExclusive},
		{"AuxAddressSharedWithMAC", testAuxShared},
		{"ReleaseExactlyOnce", testReleaseOnce},
		{"IPv6", testIPv6},
		{"AttachEndpoint", testAttach},
		{"AllocationReadsNoPool", testScales},
		{"FillsHolesAfterWrap", testHoles},
		{"LeftoversStayReserved", testLeftovers},
		{"Swarm", testSwarm},
		{"CarveAcrossSpaces", testCarveAcrossSpaces},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newEnv(t, b)) })
	}
	t.Run("ConcurrentClients", func(t *testing.T) { Concurrent(t, b, 3, 300) })
	if b.URL != nil { // the in-memory fake cannot be shared between processes
		t.Run("ConcurrentProcesses", func(t *testing.T) { Processes(t, b, 3, 300) })
	}
}

// env is one test's store namespace; each host gets its own client.
type env struct {
	t  *testing.T
	b  Backend
	ns string
}

func newEnv(t *testing.T, b Backend) *env {
	return &env{t: t, b: b, ns: namespace(t)}
}

func namespace(t *testing.T) string {
	return fmt.Sprintf("t%d-%s", time.Now().UnixNano()%1e9, strings.ReplaceAll(t.Name(), "/", "-"))
}

// host returns a driver for host id on a new client of the test's store.
func (e *env) host(id string, opts ...func(*dnpipam.Options)) *dnpipam.Driver {
	o := dnpipam.Options{HostID: id, Logger: quietLogger()}
	for _, f := range opts {
		f(&o)
	}
	return dnpipam.New(e.b.Open(e.t, e.ns), o)
}

func quietLogger() *slog.Logger {
	if os.Getenv("DNP_IPAMTEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// Request helpers: fail the test on error, return what Docker would see.

func pool(t testing.TB, d *dnpipam.Driver, space, subnet, rng string, v6 bool, opts map[string]string) *ipam.RequestPoolResponse {
	t.Helper()
	res, err := d.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: space, Pool: subnet, SubPool: rng, V6: v6, Options: opts})
	if err != nil {
		t.Fatalf("host %s: RequestPool(%s %s %s): %v", d.HostID(), space, subnet, rng, err)
	}
	return res
}

func localPool(t testing.TB, d *dnpipam.Driver, subnet, rng string) string {
	t.Helper()
	return pool(t, d, dnpipam.LocalSpace, subnet, rng, strings.Contains(subnet, ":"), nil).PoolID
}

var gatewayOpts = map[string]string{"RequestAddressType": "com.docker.network.gateway"}

func requestAddr(d *dnpipam.Driver, poolID, addr string, opts map[string]string) (string, error) {
	res, err := d.RequestAddress(context.Background(), &ipam.RequestAddressRequest{PoolID: poolID, Address: addr, Options: opts})
	if err != nil {
		return "", err
	}
	return res.Address, nil
}

func addr(t testing.TB, d *dnpipam.Driver, poolID, want string, opts map[string]string) string {
	t.Helper()
	got, err := requestAddr(d, poolID, want, opts)
	if err != nil {
		t.Fatalf("host %s: RequestAddress(%s, %q, %v): %v", d.HostID(), poolID, want, opts, err)
	}
	return got
}

func release(t testing.TB, d *dnpipam.Driver, poolID, a string) {
	t.Helper()
	if err := d.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: poolID, Address: ipOf(a)}); err != nil {
		t.Fatalf("host %s: ReleaseAddress(%s, %s): %v", d.HostID(), poolID, a, err)
	}
}

func releasePool(t testing.TB, d *dnpipam.Driver, poolID string) {
	t.Helper()
	if err := d.ReleasePool(context.Background(), &ipam.ReleasePoolRequest{PoolID: poolID}); err != nil {
		t.Fatalf("host %s: ReleasePool(%s): %v", d.HostID(), poolID, err)
	}
}

// ipOf strips the mask of an address as RequestAddress returns it.
func ipOf(s string) string {
	if i := strings.IndexByte(s, '/'); i >= 0 {
		return s[:i]
	}
	return s
}

// wantErr checks err is of kind and its message names every one of parts.
func wantErr(t testing.TB, err, kind error, what string, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: no error, want %v", what, kind)
	}
	if !errors.Is(err, kind) {
		t.Fatalf("%s: error %q is not %v", what, err, kind)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Fatalf("%s: error %q does not mention %q", what, err, p)
		}
	}
}

// allocations lists what is allocated in the subnet of poolID.
func allocations(t testing.TB, d *dnpipam.Driver, poolID string) []dnpipam.Allocation {
	t.Helper()
	list, err := d.Allocations(ctxT(t, 30*time.Second), poolID)
	if err != nil {
		t.Fatalf("allocations of %s: %v", poolID, err)
	}
	return list
}

func sortedAddrs(list []string) []string {
	out := append([]string(nil), list...)
	sort.Slice(out, func(i, j int) bool {
		a, _ := netip.ParseAddr(ipOf(out[i]))
		b, _ := netip.ParseAddr(ipOf(out[j]))
		return a.Less(b)
	})
	return out
}

// countingStore counts the calls made to a real store.
type countingStore struct {
	store.Store
	mu    sync.Mutex
	calls map[string]int
}

func (c *countingStore) count(op string) {
	c.mu.Lock()
	c.calls[op]++
	c.mu.Unlock()
}

func (c *countingStore) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for k, v := range c.calls {
		out[k] = v
	}
	return out
}

func (c *countingStore) Get(ctx context.Context, key string) (store.KV, error) {
	c.count("get")
	return c.Store.Get(ctx, key)
}

func (c *countingStore) List(ctx context.Context, dir string) ([]store.KV, error) {
	c.count("list")
	return c.Store.List(ctx, dir)
}

func (c *countingStore) Put(ctx context.Context, key string, value []byte) (int64, error) {
	c.count("put")
	return c.Store.Put(ctx, key, value)
}

func (c *countingStore) Delete(ctx context.Context, key string) error {
	c.count("delete")
	return c.Store.Delete(ctx, key)
}

func (c *countingStore) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	c.count("cas")
	return c.Store.CompareAndSwap(ctx, key, value, version)
}

func (c *countingStore) Txn(ctx context.Context, ops ...store.Op) error {
	c.count("txn")
	return c.Store.Txn(ctx, ops...)
}
