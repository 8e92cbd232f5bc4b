package ipam_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/ipam/ipamtest"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

func TestMain(m *testing.M) {
	ipamtest.Main(m, func(ctx context.Context, url string) (store.Store, error) {
		return stores.Open(ctx, store.Config{URL: url})
	})
}

// TestFake runs the suite on the in-memory fake (fast, no processes).
func TestFake(t *testing.T) {
	var mu sync.Mutex
	byNS := map[string]*fakeStore{}
	ipamtest.Run(t, ipamtest.Backend{
		Name: "fake",
		Open: func(t testing.TB, ns string) store.Store {
			mu.Lock()
			defer mu.Unlock()
			if byNS[ns] == nil {
				byNS[ns] = newFakeStore()
			}
			return byNS[ns]
		},
	})
}

// TestBolt runs the suite on the embedded store, including three OS
// processes sharing one file.
func TestBolt(t *testing.T) {
	dir := t.TempDir()
	url := func(ns string) string { return "bolt://" + filepath.Join(dir, ns+".db") }
	ipamtest.Run(t, ipamtest.Backend{
		Name: "bolt",
		URL:  url,
		Open: func(t testing.TB, ns string) store.Store { return open(t, url(ns)) },
	})
}

// TestEtcd runs the suite on a real etcd server.
func TestEtcd(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	runServer(t, "etcd", srv)
}

// TestConsul runs the suite on a real Consul server.
func TestConsul(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	runServer(t, "consul", srv)
}

// TestZooKeeper runs the suite on a real ZooKeeper server.
func TestZooKeeper(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	runServer(t, "zk", srv)
}

func runServer(t *testing.T, name string, srv *testenv.Server) {
	ipamtest.Run(t, ipamtest.Backend{
		Name: name,
		URL:  srv.URL,
		Open: func(t testing.TB, ns string) store.Store { return open(t, srv.URL(ns)) },
	})
}

func open(t testing.TB, url string) store.Store {
	t.Helper()
	s, err := stores.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}
