package zk_test

import (
	"context"
	"errors"
	"net"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	gozk "github.com/go-zookeeper/zk"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
	"github.com/dnplabs/docker-net-plugin/store/zk"
)

func TestMain(m *testing.M) { storetest.Main(m, zk.Open) }

// liveTTL: the test server's tick is 200ms, so sessions this short are
// granted and expire within one tick of their timeout.
const liveTTL = time.Second

func TestConformance(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	b := storetest.OnServer("zk", zk.Open, srv)
	b.Partitioned = storetest.Partition(zk.Open, srv.Scheme, srv.Addr)
	b.LiveTTL, b.LiveExpiry = liveTTL, liveTTL+2*time.Second
	storetest.Run(t, b)
}

func open(t testing.TB, cfg store.Config) store.Store { return storetest.Open(t, zk.Open, cfg) }

func ctxT(t testing.TB, d time.Duration) context.Context { return testenv.Context(t, d) }

// rawConn is a plain ZooKeeper client, to look at znodes as an operator
// would.
func rawConn(t testing.TB, addr string, auth ...string) *gozk.Conn {
	t.Helper()
	conn, events, err := gozk.Connect([]string{addr}, 10*time.Second, gozk.WithLogger(nopLogger{}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(conn.Close)
	timeout := time.After(10 * time.Second)
	for conn.State() != gozk.StateHasSession {
		select {
		case <-events:
		case <-timeout:
			t.Fatalf("raw zookeeper client: no session with %s", addr)
		}
	}
	for _, a := range auth {
		if err := conn.AddAuth("digest", []byte(a)); err != nil {
			t.Fatalf("add auth: %v", err)
		}
	}
	return conn
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}

func keys(kvs []store.KV) []string {
	out := []string{}
	for _, kv := range kvs {
		out = append(out, kv.Key)
	}
	return out
}

// waitValue polls key until it holds want (or, with want "", is absent).
func waitValue(t *testing.T, s store.Store, key, want string, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		kv, err := s.Get(ctxT(t, 3*time.Second), key)
		if want == "" && errors.Is(err, store.ErrNotFound) {
			return
		}
		if want != "" && err == nil && string(kv.Value) == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: want %q within %s, have %q, %v", key, want, d, kv.Value, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Keys below other keys need parent znodes; those placeholders are never
// listed, are removed with their last key, and a deleted key that still
// has keys below it turns into one.
func TestPlaceholders(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("dnp/ph")})
	raw := rawConn(t, srv.Addr)
	ctx := ctxT(t, 30*time.Second)

	if _, err := s.Put(ctx, "p/a/b/c", []byte("deep")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"/dnp", "/dnp/ph", "/dnp/ph/p", "/dnp/ph/p/a", "/dnp/ph/p/a/b"} {
		data, _, err := raw.Get(p)
		if err != nil || len(data) != 0 {
			t.Fatalf("parent %s: %q, %v; want an empty placeholder", p, data, err)
		}
	}
	for _, dir := range []string{"p", "p/a", "p/a/b"} {
		got, err := s.List(ctx, dir)
		if err != nil || !reflect.DeepEqual(keys(got), []string{"p/a/b/c"}) {
			t.Fatalf("list %s = %v, %v; want only the key p/a/b/c", dir, keys(got), err)
		}
	}
	if _, err := s.Get(ctx, "p/a"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get of a placeholder: %v, want not found", err)
	}
	if err := s.Delete(ctx, "p/a/b/c"); err != nil {
		t.Fatal(err)
	}
	if ok, _, err := raw.Exists("/dnp/ph/p"); err != nil || ok {
		t.Fatalf("/dnp/ph/p still exists (%v, %v) after its last key went", ok, err)
	}
	if ok, _, err := raw.Exists("/dnp/ph"); err != nil || !ok {
		t.Fatalf("the prefix znode went too: %v, %v", ok, err)
	}

	// A key with keys below it.
	if _, err := s.Put(ctx, "q/x", []byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(ctx, "q/x/y", []byte("y")); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "q/x"); err != nil {
		t.Fatal(err)
	}
	if got, err := s.List(ctx, "q"); err != nil || !reflect.DeepEqual(keys(got), []string{"q/x/y"}) {
		t.Fatalf("list q after deleting q/x = %v, %v; want [q/x/y]", keys(got), err)
	}
	if _, err := s.Get(ctx, "q/x"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get of deleted q/x: %v", err)
	}
	// A placeholder does not count as an existing key for create.
	if _, err := s.CompareAndSwap(ctx, "q/x", []byte("again"), 0); err != nil {
		t.Fatalf("create over a placeholder: %v", err)
	}
	if err := s.Txn(ctx, store.Create("q/x/y/z", []byte("z")), store.Create("q/new/deep/key", nil)); err != nil {
		t.Fatalf("txn creating keys with missing parents: %v", err)
	}
	got, err := s.List(ctx, "q")
	if want := []string{"q/new/deep/key", "q/x", "q/x/y", "q/x/y/z"}; err != nil || !reflect.DeepEqual(keys(got), want) {
		t.Fatalf("list q = %v, %v; want %v", keys(got), err, want)
	}
}

// A key deleted and written again gets a version it never had, so a
// compare-and-swap from before the delete fails.
func TestVersionNotReusedAfterRecreate(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("v")})
	ctx := ctxT(t, 30*time.Second)
	v1, err := s.Put(ctx, "k", []byte("1"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	v2, err := s.Put(ctx, "k", []byte("2"))
	if err != nil {
		t.Fatal(err)
	}
	if v1 == v2 {
		t.Fatalf("re-created key has its old version %d", v1)
	}
	if _, err := s.CompareAndSwap(ctx, "k", []byte("stale"), v1); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("cas with the version from before the delete: %v, want conflict", err)
	}
	err = s.Txn(ctx, store.Delete("k", v1))
	if !errors.Is(err, store.ErrConflict) || !strings.Contains(err.Error(), `"k"`) {
		t.Fatalf("txn delete at the old version: %v, want a conflict naming k", err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || string(kv.Value) != "2" || kv.Version != v2 {
		t.Fatalf("k = %+v, %v; want 2 at %d", kv, err, v2)
	}
}

// With the server down, calls fail with ErrUnavailable (not a timeout)
// naming the server, well within their deadline; a store opened while the
// server is down works once it is up.
func TestServerDown(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("down")})
	if _, err := s.Put(ctxT(t, 10*time.Second), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	srv.Stop(t)
	late := open(t, store.Config{URL: srv.URL("down")})

	for name, st := range map[string]store.Store{"connected": s, "opened while down": late} {
		start := time.Now()
		_, err := st.Get(ctxT(t, 2*time.Second), "k")
		if !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("%s store: get with the server down: %v, want unavailable", name, err)
		}
		if !strings.Contains(err.Error(), srv.Addr) {
			t.Errorf("%s store: error %q does not name %s", name, err, srv.Addr)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("%s store: took %s with a 2s deadline", name, d)
		}
		t.Logf("%s store, server down: %v", name, err)
	}

	srv.Start(t)
	waitValue(t, late, "k", "v", 15*time.Second)
	waitValue(t, s, "k", "v", 15*time.Second)
}

// When the server expires the sessions of a partitioned client, the client's
// registered key goes, and comes back when the client reconnects; its
// watch starts over with a reset and shows what changed meanwhile.
func TestSessionExpiry(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	p := testenv.StartProxy(t, srv.Addr)
	restore := zk.SetSessionTimeout(time.Second)
	cut := open(t, store.Config{URL: "zk://" + p.Addr() + "/exp"})
	restore()
	other := open(t, store.Config{URL: srv.URL("exp")})
	ctx := ctxT(t, time.Minute)

	if _, err := other.Put(ctx, "w/before", []byte("1")); err != nil {
		t.Fatal(err)
	}
	events, err := cut.Watch(ctx, "w")
	if err != nil {
		t.Fatal(err)
	}
	next := func(what string) store.Event {
		t.Helper()
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatalf("watch closed while waiting for %s", what)
			}
			return ev
		case <-time.After(20 * time.Second):
			t.Fatalf("no watch event for %s", what)
		}
		return store.Event{}
	}
	if ev := next("the first snapshot"); ev.Type != store.EventReset || !reflect.DeepEqual(keys(ev.Snapshot), []string{"w/before"}) {
		t.Fatalf("first event %s %v, want reset with w/before", ev.Type, keys(ev.Snapshot))
	}
	if _, err := cut.Register(ctx, "hosts/h1", []byte("alive"), liveTTL); err != nil {
		t.Fatal(err)
	}
	waitValue(t, other, "hosts/h1", "alive", 5*time.Second)

	p.Cut()
	// The server expires both sessions of the cut client after about 1s.
	waitValue(t, other, "hosts/h1", "", 5*time.Second)
	if _, err := other.Put(ctx, "w/during", []byte("2")); err != nil {
		t.Fatal(err)
	}
	if err := other.Delete(ctx, "w/before"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	p.Heal()

	waitValue(t, other, "hosts/h1", "alive", 10*time.Second)
	for {
		ev := next("a reset after the session expired")
		if ev.Type != store.EventReset {
			continue
		}
		if !reflect.DeepEqual(keys(ev.Snapshot), []string{"w/during"}) {
			t.Fatalf("reset after expiry holds %v, want [w/during]", keys(ev.Snapshot))
		}
		break
	}
	// And the new session's watches work.
	if _, err := other.Put(ctx, "w/after", []byte("3")); err != nil {
		t.Fatal(err)
	}
	if ev := next("w/after"); ev.Type != store.EventPut || ev.KV.Key != "w/after" || string(ev.KV.Value) != "3" {
		t.Fatalf("after the reset: %s %+v, want put w/after=3", ev.Type, ev.KV)
	}
}

// With credentials, nodes are readable only by the same user, and the
// store works against a server that refuses unauthenticated clients, also
// across a server restart.
func TestDigestAuth(t *testing.T) {
	srv := testenv.StartZooKeeperAuth(t, testenv.ServerOptions{})
	alice := open(t, store.Config{URL: srv.URL("auth"), Username: "alice", Password: "s3cret"})
	ctx := ctxT(t, time.Minute)
	if _, err := alice.Put(ctx, "a/k", []byte("private")); err != nil {
		t.Fatalf("put with credentials: %v", err)
	}
	events, err := alice.Watch(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-events; ev.Type != store.EventReset || len(ev.Snapshot) != 1 {
		t.Fatalf("watch with credentials: %s %v", ev.Type, keys(ev.Snapshot))
	}

	for name, cfg := range map[string]store.Config{
		"no credentials":   {URL: srv.URL("auth")},
		"another user":     {URL: srv.URL("auth"), Username: "mallory", Password: "s3cret"},
		"a wrong password": {URL: srv.URL("auth"), Username: "alice", Password: "guess"},
	} {
		s := open(t, cfg)
		start := time.Now()
		_, err := s.Get(ctxT(t, 2*time.Second), "a/k")
		if err == nil {
			t.Fatalf("%s: read alice's key", name)
		}
		if !errors.Is(err, store.ErrDenied) {
			t.Errorf("%s: %v, want store access denied", name, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("%s: refused after %s, deadline was 2s", name, d)
		}
		t.Logf("%s: %v", name, err)
	}
	// The ACL itself, as an operator sees it.
	acl, _, err := rawConn(t, srv.Addr, "alice:s3cret").GetACL("/auth/a/k")
	if err != nil || len(acl) != 1 || acl[0].Scheme != "digest" || !strings.HasPrefix(acl[0].ID, "alice:") {
		t.Fatalf("ACL of /auth/a/k = %+v, %v; want digest alice only", acl, err)
	}

	srv.Stop(t)
	srv.Start(t)
	waitValue(t, alice, "a/k", "private", 15*time.Second)
	if _, err := alice.Put(ctx, "a/k2", []byte("after restart")); err != nil {
		t.Fatalf("put after restart: %v", err)
	}
	for {
		select {
		case ev := <-events:
			if ev.Type == store.EventPut && ev.KV.Key == "a/k2" {
				return
			}
		case <-time.After(15 * time.Second):
			t.Fatal("watch saw no a/k2 after the restart")
		}
	}
}

func TestOpenRejectsBadConfig(t *testing.T) {
	for _, cfg := range []store.Config{
		{URL: "etcd://127.0.0.1:2379/x"},
		{URL: "zk:///x"},
		{URL: "zk://127.0.0.1:2181/x", Username: "only-user"},
	} {
		s, err := zk.Open(context.Background(), cfg)
		if !errors.Is(err, store.ErrInvalid) {
			if s != nil {
				s.Close()
			}
			t.Errorf("open %+v: %v, want invalid", cfg, err)
		}
	}
}

// A restarted plugin registers the live key its previous run still holds
// (that session has not expired yet): the key passes to the new session in
// one step, so watchers never see it missing, and the old session ending
// leaves it alone.
func TestRegisterTakesOver(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
	ctx := ctxT(t, time.Minute)
	old := open(t, store.Config{URL: srv.URL("takeover")})
	if _, err := old.Register(ctx, "hosts/h1", []byte("run0"), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	watcher := open(t, store.Config{URL: srv.URL("takeover")})
	events, err := watcher.Watch(ctx, "hosts")
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-events; ev.Type != store.EventReset || !reflect.DeepEqual(keys(ev.Snapshot), []string{"hosts/h1"}) {
		t.Fatalf("first event %s %v, want a reset with hosts/h1", ev.Type, keys(ev.Snapshot))
	}

	// Each Register has a session of its own: every round is a takeover.
	restarted := open(t, store.Config{URL: srv.URL("takeover")})
	const rounds = 20
	for i := 1; i <= rounds; i++ {
		if _, err := restarted.Register(ctx, "hosts/h1", []byte("run"+strconv.Itoa(i)), 10*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	last := "run" + strconv.Itoa(rounds)
	waitValue(t, watcher, "hosts/h1", last, 5*time.Second)
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	waitValue(t, watcher, "hosts/h1", last, time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Type == store.EventDelete || (ev.Type == store.EventReset && len(ev.Snapshot) == 0) {
				t.Fatalf("a watcher saw the live key go away during a takeover: %s %v", ev.Type, ev.KV.Key)
			}
			continue
		default:
		}
		break
	}
}

// A plugin call gives its store calls a long deadline (dockerd waits up
// to 30s). With the server down, a call must still fail within a few
// seconds, as unavailable and naming the server, not wait out that
// deadline while dockerd waits on the plugin.
func TestDownFailsFastWithLongDeadline(t *testing.T) {
	srv := testenv.StartZooKeeper(t, testenv.ServerOptions{})
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

// A server that takes the connection but never answers the connect
// request (ZooKeeper 3.8 does that to clients that connect while it
// starts) is given up within seconds and tried again, not waited on for
// over a minute while the session expires: the client reconnects.
func TestSilentServer(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	accepted := make(chan net.Conn, 16)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c // held open, never answered
		}
	}()
	t.Cleanup(func() {
		for {
			select {
			case c := <-accepted:
				c.Close()
			default:
				return
			}
		}
	})

	s := open(t, store.Config{URL: "zk://" + l.Addr().String() + "/silent"})
	start := time.Now()
	if _, err := s.Get(ctxT(t, 2*time.Second), "k"); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("get from a silent server: %v, want unavailable", err)
	}
	// The default 10 s session: the handshake waits 3.3 s, then the
	// client sleeps 1 s before it tries its only server again.
	var held []net.Conn
	timeout := time.After(10 * time.Second)
	for len(held) < 2 {
		select {
		case c := <-accepted:
			held = append(held, c)
		case <-timeout:
			t.Fatalf("the client still waits on its first connection to a silent server after %s", time.Since(start).Round(time.Millisecond))
		}
	}
	t.Logf("the client tried the silent server again after %s", time.Since(start).Round(time.Millisecond))
	for _, c := range held {
		accepted <- c // closed by the cleanup
	}
}
