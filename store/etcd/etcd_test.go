package etcd_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/etcd"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
)

func TestMain(m *testing.M) { storetest.Main(m, etcd.Open) }

// liveTTL is the shortest lease etcd grants with its default timings
// (1.5 election timeouts, rounded up to whole seconds).
const liveTTL = 2 * time.Second

func TestConformance(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	b := storetest.OnServer("etcd", etcd.Open, srv)
	b.Partitioned = storetest.Partition(etcd.Open, srv.Scheme, srv.Addr)
	// A lease expires TTL after the last keepalive; etcd looks for
	// expired leases every 500ms and then commits the revocation.
	b.LiveTTL, b.LiveExpiry = liveTTL, liveTTL+3*time.Second
	storetest.Run(t, b)
}

func open(t testing.TB, cfg store.Config) store.Store { return storetest.Open(t, etcd.Open, cfg) }

func ctxT(t testing.TB, d time.Duration) context.Context { return testenv.Context(t, d) }

// rawClient is a plain etcd client for doing what an operator would
// (revoking a lease, enabling auth) behind the store's back.
func rawClient(t testing.TB, srv *testenv.Server, user, password string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{"http://" + srv.Addr},
		DialTimeout: 5 * time.Second,
		Username:    user,
		Password:    password,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		t.Fatalf("etcd client: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// waitValue polls key until it holds want (or, with want "", is absent).
func waitValue(t *testing.T, s store.Store, key, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		kv, err := s.Get(ctxT(t, 3*time.Second), key)
		switch {
		case want == "" && errors.Is(err, store.ErrNotFound):
			return
		case want != "" && err == nil && string(kv.Value) == want:
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: want %q within %s; last: %q, %v", key, want, d, kv.Value, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// next returns the next watch event, failing the test after d.
func next(t *testing.T, ch <-chan store.Event, d time.Duration) store.Event {
	t.Helper()
	select {
	case ev, ok := <-ch:
		if !ok {
			t.Fatalf("watch channel closed early")
		}
		return ev
	case <-time.After(d):
		t.Fatalf("no watch event within %s", d)
	}
	return store.Event{}
}

// The plugin starts before its store: Open works with no server, calls
// fail with the endpoint named, and everything works once the server is up.
func TestStoreAppearsLater(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	srv.Stop(t)

	start := time.Now()
	s := open(t, store.Config{URL: srv.URL("late")})
	if d := time.Since(start); d > time.Second {
		t.Fatalf("open took %s with no server", d)
	}
	wctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := s.Watch(wctx, "dir")
	if err != nil {
		t.Fatalf("watch with no server: %v", err)
	}

	ctx, cancelGet := context.WithTimeout(context.Background(), time.Second)
	_, err = s.Get(ctx, "dir/k")
	cancelGet()
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("get with no server: %v, want store unavailable", err)
	}
	if !strings.Contains(err.Error(), srv.Addr) || !strings.Contains(err.Error(), "dir/k") {
		t.Fatalf("error %q names neither the endpoint %s nor the key", err, srv.Addr)
	}
	if d := time.Since(start); d > 2500*time.Millisecond {
		t.Fatalf("get with a 1s deadline returned after %s", d)
	}

	srv.Start(t)
	ev := next(t, ch, 15*time.Second)
	if ev.Type != store.EventReset || len(ev.Snapshot) != 0 {
		t.Fatalf("first event once the server is up: %+v, want an empty reset", ev)
	}
	if _, err := s.Put(ctxT(t, 10*time.Second), "dir/k", []byte("v")); err != nil {
		t.Fatalf("put once the server is up: %v", err)
	}
	ev = next(t, ch, 10*time.Second)
	if ev.Type != store.EventPut || ev.KV.Key != "dir/k" || string(ev.KV.Value) != "v" || ev.KV.Version <= 0 {
		t.Fatalf("event after put: %+v", ev)
	}
}

// After an outage the watch resumes from the last revision it saw: what
// changed meanwhile arrives as ordinary events, with no reset and no
// re-read of the directory. Only when etcd compacted that history does it
// send a fresh reset. Close closes the channel.
func TestWatchResumesAfterOutage(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	p := testenv.StartProxy(t, srv.Addr)
	s := open(t, store.Config{URL: "etcd://" + p.Addr() + "/resume"})
	other := open(t, store.Config{URL: srv.URL("resume")})
	mustPut := func(k, v string) {
		t.Helper()
		if _, err := other.Put(ctxT(t, 10*time.Second), k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	mustDelete := func(k string) {
		t.Helper()
		if err := other.Delete(ctxT(t, 10*time.Second), k); err != nil {
			t.Fatal(err)
		}
	}
	mustPut("d/a", "1")
	mustPut("d/b", "1")
	ch, err := s.Watch(context.Background(), "d")
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, ch, 10*time.Second); ev.Type != store.EventReset || len(ev.Snapshot) != 2 {
		t.Fatalf("first event: %+v", ev)
	}
	// expect reads events until the ones described by want (type key=value)
	// have all come, in order; any other event fails the test.
	expect := func(what string, want ...string) {
		t.Helper()
		for _, w := range want {
			ev := next(t, ch, 20*time.Second)
			got := fmt.Sprintf("%s %s=%s", ev.Type, ev.KV.Key, ev.KV.Value)
			if ev.Type == store.EventReset {
				got = fmt.Sprintf("reset %v", ev.Snapshot)
			}
			if got != w {
				t.Fatalf("%s: got %s, want %s", what, got, w)
			}
		}
	}

	// A partition: the connection is dropped while others write.
	p.Cut()
	mustPut("d/a", "2")
	mustDelete("d/b")
	mustPut("d/c", "3")
	time.Sleep(time.Second)
	p.Heal()
	expect("after a partition", "put d/a=2", "delete d/b=", "put d/c=3")

	// A server restart (its history survives on disk).
	srv.Stop(t)
	srv.Start(t)
	mustPut("d/c", "4")
	expect("after a server restart", "put d/c=4")

	// A partition during which the changes are compacted away.
	p.Cut()
	mustPut("d/a", "5")
	mustDelete("d/c")
	raw := rawClient(t, srv, "", "")
	resp, err := raw.Get(ctxT(t, 5*time.Second), "/resume/d/a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Compact(ctxT(t, 5*time.Second), resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	p.Heal()
	ev := next(t, ch, 20*time.Second)
	if ev.Type != store.EventReset || len(ev.Snapshot) != 1 || ev.Snapshot[0].Key != "d/a" || string(ev.Snapshot[0].Value) != "5" {
		t.Fatalf("after a compaction: %s %+v %v, want a reset holding only d/a=5", ev.Type, ev.KV, ev.Snapshot)
	}
	mustPut("d/e", "6")
	expect("after the reset", "put d/e=6")

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-time.After(5 * time.Second):
			t.Fatal("watch channel still open after Close")
		}
	}
}

// A registration whose lease is revoked behind its back (an operator, or
// expiry while the client was cut off) writes its key again.
func TestRegistrationSurvivesLeaseLoss(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("lease")})
	reg, err := s.Register(ctxT(t, time.Minute), "hosts/me", []byte("10.0.0.1"), liveTTL)
	if err != nil {
		t.Fatal(err)
	}
	raw := rawClient(t, srv, "", "")
	resp, err := raw.Get(ctxT(t, 5*time.Second), "/lease/hosts/me")
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 {
		t.Fatalf("raw get of the registered key: %+v, %v; want one key with a lease", resp, err)
	}
	if _, err := raw.Revoke(ctxT(t, 5*time.Second), clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	waitValue(t, s, "hosts/me", "10.0.0.1", 10*time.Second)

	// It is alive, not a leftover: it stays past several TTLs.
	time.Sleep(3 * liveTTL)
	waitValue(t, s, "hosts/me", "10.0.0.1", 0)

	if err := reg.Release(ctxT(t, 5*time.Second)); err != nil {
		t.Fatalf("release: %v", err)
	}
	waitValue(t, s, "hosts/me", "", 0)
	if err := reg.Release(ctxT(t, 5*time.Second)); err != nil {
		t.Fatalf("second release: %v", err)
	}
}

// A registration outlives a server outage longer than its TTL, and it
// ends (key gone) when its context ends.
func TestRegistrationAfterLongOutage(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("outage")})
	rctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := s.Register(rctx, "hosts/me", []byte("up"), liveTTL); err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	time.Sleep(2 * liveTTL)
	srv.Start(t)
	waitValue(t, s, "hosts/me", "up", 10*time.Second)
	// The lease restored by the restart expires unless renewed: the key
	// must still be there well after that.
	time.Sleep(3 * liveTTL)
	waitValue(t, s, "hosts/me", "up", 0)

	cancel()
	waitValue(t, s, "hosts/me", "", 5*time.Second)
}

// With etcd authentication on, the username and password are used, and a
// wrong password is reported.
func TestAuth(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	raw := rawClient(t, srv, "", "")
	ctx := ctxT(t, 30*time.Second)
	if _, err := raw.RoleAdd(ctx, "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.UserAdd(ctx, "root", "rootpw"); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := raw.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}

	anon := open(t, store.Config{URL: srv.URL("auth")})
	if _, err := anon.Put(ctx, "k", []byte("v")); err == nil {
		t.Fatal("put without credentials worked with auth enabled")
	}
	bad := open(t, store.Config{URL: srv.URL("auth"), Username: "root", Password: "wrong"})
	_, err := bad.Get(ctx, "k")
	if err == nil || !strings.Contains(err.Error(), "authentication failed") {
		t.Fatalf("get with a wrong password: %v, want an authentication failure", err)
	}

	s := open(t, store.Config{URL: srv.URL("auth"), Username: "root", Password: "rootpw"})
	v, err := s.CompareAndSwap(ctx, "k", []byte("v"), 0)
	if err != nil {
		t.Fatalf("cas with credentials: %v", err)
	}
	ch, err := s.Watch(ctx, "dir")
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, ch, 10*time.Second); ev.Type != store.EventReset {
		t.Fatalf("first watch event: %+v", ev)
	}
	reg, err := s.Register(ctx, "dir/live", []byte("x"), liveTTL)
	if err != nil {
		t.Fatalf("register with credentials: %v", err)
	}
	if ev := next(t, ch, 10*time.Second); ev.Type != store.EventPut || ev.KV.Key != "dir/live" {
		t.Fatalf("watch event: %+v", ev)
	}
	if err := reg.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || kv.Version != v {
		t.Fatalf("get: %+v, %v", kv, err)
	}

	// Logging in needs the server: a client opened while it is down
	// reports it unavailable, and logs in once it is back.
	srv.Stop(t)
	late := open(t, store.Config{URL: srv.URL("auth"), Username: "root", Password: "rootpw"})
	gctx, cancel := context.WithTimeout(context.Background(), time.Second)
	start := time.Now()
	_, err = late.Get(gctx, "k")
	cancel()
	if !errors.Is(err, store.ErrUnavailable) || time.Since(start) > 1500*time.Millisecond {
		t.Fatalf("get with credentials and no server: %v after %s, want store unavailable within 1s", err, time.Since(start))
	}
	srv.Start(t)
	if kv, err := late.Get(ctxT(t, 10*time.Second), "k"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("get after the server came back: %+v, %v", kv, err)
	}
	// The restart invalidated the first client's token: it logs in again,
	// and its watch resumes.
	if _, err := s.Put(ctxT(t, 10*time.Second), "dir/after", []byte("y")); err != nil {
		t.Fatalf("put with credentials after the restart: %v", err)
	}
	for {
		ev := next(t, ch, 15*time.Second)
		if ev.Type == store.EventPut && ev.KV.Key == "dir/after" {
			break
		}
		if ev.Type == store.EventReset && len(ev.Snapshot) == 1 && ev.Snapshot[0].Key == "dir/after" {
			break
		}
	}
}

func TestOpenRejectsBadConfig(t *testing.T) {
	for _, cfg := range []store.Config{
		{URL: "consul://127.0.0.1:8500/x"},
		{URL: "etcd:///x"},
		{URL: "etcd://127.0.0.1:2379/x", CAFile: "/nonexistent/ca.pem"},
		{URL: "etcd://127.0.0.1:2379/x", CertFile: "/nonexistent/cert.pem"},
		{URL: "etcd://127.0.0.1:2379/x", Username: "root"},
	} {
		s, err := etcd.Open(context.Background(), cfg)
		if !errors.Is(err, store.ErrInvalid) {
			if s != nil {
				s.Close()
			}
			t.Errorf("open %+v: %v, want invalid", cfg, err)
		}
	}
}

// A plugin call gives its store calls a long deadline (dockerd waits up
// to 30s). With the server down, a call must still fail within a few
// seconds, as unavailable and naming the server, not wait out that
// deadline while dockerd waits on the plugin.
func TestDownFailsFastWithLongDeadline(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("fast")})
	if _, err := s.Put(ctxT(t, 10*time.Second), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	for _, op := range []string{"get", "put"} {
		start := time.Now()
		var err error
		if op == "get" {
			_, err = s.Get(ctxT(t, 25*time.Second), "k")
		} else {
			_, err = s.Put(ctxT(t, 25*time.Second), "k", []byte("w"))
		}
		took := time.Since(start)
		if !errors.Is(err, store.ErrUnavailable) || !strings.Contains(err.Error(), srv.Addr) {
			t.Fatalf("%s with the server down: %v, want unavailable naming %s", op, err, srv.Addr)
		}
		if took > 4*time.Second {
			t.Fatalf("%s with the server down took %s with a 25s deadline, want at most 4s", op, took.Round(time.Millisecond))
		}
		t.Logf("%s, server down: failed in %s: %v", op, took.Round(time.Millisecond), err)
	}
}

// A directory larger than one range request (5,000 keys) is listed, and
// snapshotted by a watch, whole and sorted.
func TestListInPages(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("pages")})
	ctx := ctxT(t, time.Minute)
	const n = 12345
	var want []string
	var ops []store.Op
	for i := range n {
		// Keys with a key-and-directory pair among them ("d/k7" and
		// "d/k7/sub"), which a page may split.
		k := fmt.Sprintf("d/k%d", i)
		if i%100 == 7 {
			k += "/sub"
		}
		want = append(want, k)
		ops = append(ops, store.Put(k, []byte(strconv.Itoa(i))))
		if len(ops) == store.MaxTxnOps || i == n-1 {
			if err := s.Txn(ctx, ops...); err != nil {
				t.Fatal(err)
			}
			ops = nil
		}
	}
	if _, err := s.Put(ctx, "d/k7", []byte("key and directory")); err != nil {
		t.Fatal(err)
	}
	want = append(want, "d/k7")
	sort.Strings(want)
	if _, err := s.Put(ctx, "e/outside", nil); err != nil {
		t.Fatal(err)
	}

	got, err := s.List(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(keysOf(got), want) {
		t.Fatalf("list of %d keys returned %d, or out of order", len(want), len(got))
	}
	ch, err := s.Watch(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	ev := next(t, ch, 10*time.Second)
	if ev.Type != store.EventReset || !reflect.DeepEqual(keysOf(ev.Snapshot), want) {
		t.Fatalf("watch snapshot: %s with %d keys, want a reset with the %d keys in order", ev.Type, len(ev.Snapshot), len(want))
	}
}

func keysOf(kvs []store.KV) []string {
	var out []string
	for _, kv := range kvs {
		out = append(out, kv.Key)
	}
	return out
}
