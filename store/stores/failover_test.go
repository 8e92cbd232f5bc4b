package stores_test

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// TestClusterFailover: a client of a 3-server cluster (etcd and ZooKeeper
// by a URL naming the 3 servers, Consul through a client agent) keeps
// writing while the leader is killed (SIGKILL) and comes back. No call
// fails, a watch started before ends up with exactly what was written, and
// the store holds exactly what the calls that succeeded wrote.
func TestClusterFailover(t *testing.T) {
	for _, kind := range []string{"etcd", "zk", "consul"} {
		t.Run(kind, func(t *testing.T) { testClusterFailover(t, kind) })
	}
}

func testClusterFailover(t *testing.T, kind string) {
	members := []testenv.ServerOptions{{}, {}, {}} // 127.0.0.1, ports of their own
	start := time.Now()
	c := testenv.StartCluster(t, kind, members)
	t.Logf("%s cluster up in %s", kind, time.Since(start).Round(time.Millisecond))
	url := c.URL("failover")
	if kind == "consul" {
		url = testenv.StartConsulAgent(t, c, "client", testenv.ServerOptions{}).URL("failover")
	}
	s, err := stores.Open(context.Background(), store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	ctx := testenv.Context(t, 2*time.Minute)

	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	events, err := s.Watch(wctx, "w")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	var seenMu sync.Mutex
	go func() {
		for ev := range events {
			seenMu.Lock()
			switch ev.Type {
			case store.EventReset:
				clear(seen)
				for _, kv := range ev.Snapshot {
					seen[kv.Key] = string(kv.Value)
				}
			case store.EventPut:
				seen[ev.KV.Key] = string(ev.KV.Value)
			case store.EventDelete:
				delete(seen, ev.KV.Key)
			}
			seenMu.Unlock()
		}
	}()

	// Writers: each creates keys (CAS and transactions), updates and
	// deletes some, as the plugin does with endpoints and addresses.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	want := map[string]string{}
	var failures []string
	var slowest time.Duration
	for w := range 3 {
		wg.Go(func() {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprintf("w/%d/%d", w, n)
				val := fmt.Sprintf("%d-%d-%d", w, n, time.Now().UnixNano())
				start := time.Now()
				var err error
				var what string
				switch n % 4 {
				case 0, 1:
					what = "cas create " + key
					_, err = s.CompareAndSwap(ctx, key, []byte(val), 0)
				case 2:
					what = "txn create " + key + " and delete the previous key"
					prev := fmt.Sprintf("w/%d/%d", w, n-1)
					var kv store.KV
					if kv, err = s.Get(ctx, prev); err == nil {
						err = s.Txn(ctx, store.Create(key, []byte(val)), store.Delete(prev, kv.Version))
					}
				case 3:
					what = "put " + key + " and delete it"
					if _, err = s.Put(ctx, key, []byte(val)); err == nil {
						err = s.Delete(ctx, key)
					}
				}
				took := time.Since(start)
				mu.Lock()
				slowest = max(slowest, took)
				if err != nil {
					failures = append(failures, fmt.Sprintf("%s after %s: %v", what, took.Round(time.Millisecond), err))
				} else {
					switch n % 4 {
					case 0, 1:
						want[key] = val
					case 2:
						want[key] = val
						delete(want, fmt.Sprintf("w/%d/%d", w, n-1))
					}
				}
				mu.Unlock()
			}
		})
	}

	time.Sleep(time.Second)
	leader, err := c.Leader()
	if err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	leader.Kill(t)
	next, err := c.WaitLeader(30 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("killed the leader %s; %s leads after %s", leader.Name, next.Name, time.Since(killed).Round(time.Millisecond))
	time.Sleep(time.Until(killed.Add(4 * time.Second)))
	leader.Start(t)
	t.Logf("%s back after %s", leader.Name, time.Since(killed).Round(time.Millisecond))
	time.Sleep(2 * time.Second)
	close(stop)
	wg.Wait()

	t.Logf("%d keys written; slowest call %s", len(want), slowest.Round(time.Millisecond))
	for i, f := range failures {
		if i == 10 {
			t.Errorf("... and %d more", len(failures)-i)
			break
		}
		t.Errorf("failed across the failover: %s", f)
	}
	kvs, err := s.List(ctx, "w")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, kv := range kvs {
		got[kv.Key] = string(kv.Value)
	}
	if !maps.Equal(got, want) {
		t.Errorf("the store holds %d keys, the calls that succeeded wrote %d:\n  extra or changed: %v\n  missing or changed: %v",
			len(got), len(want), diffKeys(got, want), diffKeys(want, got))
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		seenMu.Lock()
		same := maps.Equal(seen, want)
		n := len(seen)
		seenMu.Unlock()
		if same {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watch did not catch up: it shows %d keys, the store has %d", n, len(want))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// diffKeys lists the keys of a whose value b lacks.
func diffKeys(a, b map[string]string) []string {
	var out []string
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}
