// Package storetest is the conformance suite every store backend passes,
// run unchanged against the embedded store and real etcd, Consul and
// ZooKeeper servers.
package storetest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
)

// Restartable is a real server the suite may stop and start again.
type Restartable interface {
	Stop(t testing.TB)
	Start(t testing.TB)
}

// Backend describes the store under test.
type Backend struct {
	Name string
	// Open returns a new client of the store under namespace ns. Clients
	// opened with the same ns see the same data; different ns never meet.
	// Open registers the client's Close with t.Cleanup.
	Open func(t testing.TB, ns string) store.Store
	// URL is the store URL of namespace ns, for a child process.
	URL func(ns string) string
	// Server, when set, lets the suite stop and restart the store.
	Server Restartable
	// LiveTTL is the TTL the liveness tests ask for; zero means the backend
	// has no liveness (the embedded store keeps registered keys).
	LiveTTL time.Duration
	// LiveExpiry bounds how long a dead owner's key may survive (>= LiveTTL;
	// Consul documents up to twice the TTL).
	LiveExpiry time.Duration
	// Partitioned, when set, opens a client of namespace ns whose link to
	// the store the suite may cut while the server keeps running (a
	// network partition between that client and the store), and returns
	// the client and its link. Open registers the client's Close.
	Partitioned func(t testing.TB, ns string) (store.Store, Link)
}

// Link is a network path between one client and the store.
type Link interface {
	// Cut drops the client's connections and refuses new ones.
	Cut()
	// Heal lets the client connect again.
	Heal()
}

// Opener opens a client of the backend under test (etcd.Open, say); the
// suite's child processes use it too.
type Opener func(ctx context.Context, cfg store.Config) (store.Store, error)

// Open opens a client with open and closes it when the test ends; a Close
// that fails fails the test.
func Open(t testing.TB, open Opener, cfg store.Config) store.Store {
	t.Helper()
	s, err := open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("open %s: %v", cfg.URL, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close %s: %v", cfg.URL, err)
		}
	})
	return s
}

// NewBackend describes the backend whose namespace ns open opens at
// url(ns), with neither a server to restart nor liveness.
func NewBackend(name string, open Opener, url func(ns string) string) Backend {
	return Backend{
		Name: name,
		Open: func(t testing.TB, ns string) store.Store { return Open(t, open, store.Config{URL: url(ns)}) },
		URL:  url,
	}
}

// Files is the URL of namespace ns for a backend that keeps each
// namespace in a bolt file of its own in dir.
func Files(dir string) func(ns string) string {
	return func(ns string) string { return "bolt://" + filepath.Join(dir, ns+".db") }
}

// Server is a real store server the tests started (a *testenv.Server).
type Server interface {
	Restartable
	// URL is the store URL of namespace prefix on this server.
	URL(prefix string) string
}

// OnServer describes the backend open opens on srv; the suite may stop
// and restart srv. Set LiveTTL and LiveExpiry for its liveness.
func OnServer(name string, open Opener, srv Server) Backend {
	b := NewBackend(name, open, srv.URL)
	b.Server = srv
	return b
}

// Partition makes Backend.Partitioned for a server of scheme at addr
// (host:port): each client it opens with open goes through a proxy of its
// own, the link the suite cuts.
func Partition(open Opener, scheme, addr string) func(t testing.TB, ns string) (store.Store, Link) {
	return func(t testing.TB, ns string) (store.Store, Link) {
		p := testenv.StartProxy(t, addr)
		return Open(t, open, store.Config{URL: scheme + "://" + p.Addr() + "/" + ns}), p
	}
}

const (
	childURL = "DNP_STORETEST_CHILD_URL"
	childKey = "DNP_STORETEST_CHILD_KEY"
	childTTL = "DNP_STORETEST_CHILD_TTL"
)

// Main runs the tests, or, in a child process the suite started, registers
// a live key and waits to be killed. Call it from TestMain.
func Main(m *testing.M, open Opener) {
	if url := os.Getenv(childURL); url != "" {
		os.Exit(child(url, open))
	}
	os.Exit(m.Run())
}

func child(url string, open Opener) int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ttl, err := time.ParseDuration(os.Getenv(childTTL))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: bad ttl:", err)
		return 2
	}
	s, err := open(ctx, store.Config{URL: url})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: open:", err)
		return 2
	}
	if _, err := s.Register(ctx, os.Getenv(childKey), []byte("alive"), ttl); err != nil {
		fmt.Fprintln(os.Stderr, "child: register:", err)
		return 2
	}
	fmt.Println("registered")
	<-ctx.Done()
	return 0
}

// Run runs the whole suite against b.
func Run(t *testing.T, b Backend) {
	ns := func(t *testing.T) string {
		return fmt.Sprintf("t%d-%s", time.Now().UnixNano()%1e9, strings.ReplaceAll(t.Name(), "/", "-"))
	}
	t.Run("GetPutListDelete", func(t *testing.T) { testBasics(t, b.Open(t, ns(t))) })
	t.Run("InvalidInput", func(t *testing.T) { testInvalid(t, b.Open(t, ns(t))) })
	t.Run("CompareAndSwap", func(t *testing.T) { testCAS(t, b.Open(t, ns(t))) })
	t.Run("CASEightWriters", func(t *testing.T) { testCASRace(t, b, ns(t)) })
	t.Run("TxnAllOrNothing", func(t *testing.T) { testTxn(t, b.Open(t, ns(t))) })
	t.Run("Timeout", func(t *testing.T) { testTimeout(t, b.Open(t, ns(t))) })
	t.Run("WatchOrder", func(t *testing.T) { testWatchOrder(t, b, ns(t)) })
	t.Run("WatchBurstConverges", func(t *testing.T) { testWatchBurst(t, b, ns(t)) })
	t.Run("WatchAcrossPartition", func(t *testing.T) {
		if b.Partitioned == nil {
			t.Skipf("%s: no link to cut between a client and the store", b.Name)
		}
		testWatchPartition(t, b, ns(t))
	})
	t.Run("RegisterRelease", func(t *testing.T) { testRegisterRelease(t, b.Open(t, ns(t)), b.LiveTTL) })
	t.Run("RegisterIfTakeOver", func(t *testing.T) { testRegisterIf(t, b, ns(t)) })
	t.Run("LivenessOwnerKilled", func(t *testing.T) {
		if b.LiveTTL == 0 {
			t.Skipf("%s has no liveness: registered keys stay until released (single host)", b.Name)
		}
		testLiveness(t, b, ns(t))
	})
	t.Run("ServerRestart", func(t *testing.T) {
		if b.Server == nil {
			t.Skipf("%s is embedded: there is no server to stop", b.Name)
		}
		testRestart(t, b, ns(t))
	})
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func mustPut(t testing.TB, s store.Store, key, val string) int64 {
	t.Helper()
	v, err := s.Put(ctxT(t, 10*time.Second), key, []byte(val))
	if err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
	return v
}

func wantKind(t testing.TB, err, kind error, what string) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("%s: got error %v, want %v", what, err, kind)
	}
}

func keys(kvs []store.KV) []string {
	out := []string{}
	for _, kv := range kvs {
		out = append(out, kv.Key)
	}
	return out
}

func testBasics(t *testing.T, s store.Store) {
	ctx := ctxT(t, 30*time.Second)
	_, err := s.Get(ctx, "a/missing")
	wantKind(t, err, store.ErrNotFound, "get of a missing key")
	if !strings.Contains(err.Error(), "a/missing") {
		t.Errorf("not-found error %q does not name the key", err)
	}

	v1 := mustPut(t, s, "a/b", "one")
	if v1 <= 0 {
		t.Fatalf("version %d after put, want > 0", v1)
	}
	kv, err := s.Get(ctx, "a/b")
	if err != nil || string(kv.Value) != "one" || kv.Version != v1 || kv.Key != "a/b" {
		t.Fatalf("get a/b = %+v, %v; want value one version %d", kv, err, v1)
	}
	v2 := mustPut(t, s, "a/b", "two")
	if v2 == v1 {
		t.Fatalf("version did not change on write (%d)", v2)
	}
	mustPut(t, s, "a/c/d", "deep")
	mustPut(t, s, "a/c/e", "")
	mustPut(t, s, "ab", "sibling with the same letters")
	mustPut(t, s, "a", "the directory key itself")

	got, err := s.List(ctx, "a")
	if err != nil {
		t.Fatalf("list a: %v", err)
	}
	if want := []string{"a/b", "a/c/d", "a/c/e"}; !reflect.DeepEqual(keys(got), want) {
		t.Fatalf("list a = %v, want %v (sorted, below a/ only, any depth)", keys(got), want)
	}
	if string(got[2].Value) != "" || string(got[1].Value) != "deep" {
		t.Fatalf("list values wrong: %+v", got)
	}
	got, err = s.List(ctx, "a/c")
	if err != nil || !reflect.DeepEqual(keys(got), []string{"a/c/d", "a/c/e"}) {
		t.Fatalf("list a/c = %v, %v", keys(got), err)
	}
	got, err = s.List(ctx, "nothing/here")
	if err != nil || len(got) != 0 {
		t.Fatalf("list of an empty dir = %v, %v; want empty, no error", keys(got), err)
	}

	if err := s.Delete(ctx, "a/c/d"); err != nil {
		t.Fatalf("delete: %v", err)
	}
	_, err = s.Get(ctx, "a/c/d")
	wantKind(t, err, store.ErrNotFound, "get after delete")
	if err := s.Delete(ctx, "a/c/d"); err != nil {
		t.Fatalf("delete of a missing key: %v, want no error", err)
	}
	got, _ = s.List(ctx, "a")
	if want := []string{"a/b", "a/c/e"}; !reflect.DeepEqual(keys(got), want) {
		t.Fatalf("list after delete = %v, want %v", keys(got), want)
	}
	if kv, err := s.Get(ctx, "a"); err != nil || string(kv.Value) != "the directory key itself" {
		t.Fatalf("a key that is also a directory: %+v, %v", kv, err)
	}
}

func testInvalid(t *testing.T, s store.Store) {
	ctx := ctxT(t, 30*time.Second)
	for _, k := range []string{"", "/a", "a/", "a//b", ".", "..", "a/.", "a/..", "./a", "a/../b", "a/./b"} {
		_, err := s.Put(ctx, k, []byte("x"))
		wantKind(t, err, store.ErrInvalid, fmt.Sprintf("put %q", k))
		_, err = s.Get(ctx, k)
		wantKind(t, err, store.ErrInvalid, fmt.Sprintf("get %q", k))
		_, err = s.CompareAndSwap(ctx, k, []byte("x"), 0)
		wantKind(t, err, store.ErrInvalid, fmt.Sprintf("cas %q", k))
		wantKind(t, s.Delete(ctx, k), store.ErrInvalid, fmt.Sprintf("delete %q", k))
		wantKind(t, s.Txn(ctx, store.Put(k, nil)), store.ErrInvalid, fmt.Sprintf("txn put %q", k))
		if k != "" {
			_, err = s.List(ctx, k)
			wantKind(t, err, store.ErrInvalid, fmt.Sprintf("list %q", k))
		}
	}
	// Dots inside a segment are fine.
	if _, err := s.Put(ctx, "d/a.b/..c/v..", []byte("x")); err != nil {
		t.Fatalf("put a key with dots inside its segments: %v", err)
	}
	s.Delete(ctx, "d/a.b/..c/v..")
	wantKind(t, s.Txn(ctx), store.ErrInvalid, "empty txn")
	wantKind(t, s.Txn(ctx, store.Put("x", nil), store.Put("x", nil)), store.ErrInvalid, "txn naming a key twice")
	wantKind(t, s.Txn(ctx, store.Update("x", nil, 0)), store.ErrInvalid, "update without a version")
	var many []store.Op
	for i := 0; i <= store.MaxTxnOps; i++ {
		many = append(many, store.Put(fmt.Sprintf("m/%d", i), nil))
	}
	wantKind(t, s.Txn(ctx, many...), store.ErrInvalid, "txn over the op limit")
	if got, _ := s.List(ctx, "m"); len(got) != 0 {
		t.Fatalf("rejected txn wrote %v", keys(got))
	}
}

func testCAS(t *testing.T, s store.Store) {
	ctx := ctxT(t, 30*time.Second)
	v1, err := s.CompareAndSwap(ctx, "c/k", []byte("first"), 0)
	if err != nil || v1 <= 0 {
		t.Fatalf("create with cas: %d, %v", v1, err)
	}
	_, err = s.CompareAndSwap(ctx, "c/k", []byte("again"), 0)
	wantKind(t, err, store.ErrConflict, "create of an existing key")
	v2, err := s.CompareAndSwap(ctx, "c/k", []byte("second"), v1)
	if err != nil || v2 == v1 {
		t.Fatalf("update at the right version: %d, %v", v2, err)
	}
	_, err = s.CompareAndSwap(ctx, "c/k", []byte("stale"), v1)
	wantKind(t, err, store.ErrConflict, "update at a stale version")
	_, err = s.CompareAndSwap(ctx, "c/missing", []byte("x"), v2)
	wantKind(t, err, store.ErrConflict, "update of a missing key")
	kv, err := s.Get(ctx, "c/k")
	if err != nil || string(kv.Value) != "second" || kv.Version != v2 {
		t.Fatalf("after conflicts: %+v %v; want value second at %d", kv, err, v2)
	}
	if _, err := s.Get(ctx, "c/missing"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("failed cas created c/missing: %v", err)
	}
}

// testCASRace: 8 writers, each with its own client, race to update one key
// from the same version; exactly one wins every round.
func testCASRace(t *testing.T, b Backend, ns string) {
	const writers, rounds = 8, 15
	clients := make([]store.Store, writers)
	for i := range clients {
		clients[i] = b.Open(t, ns)
	}
	ctx := ctxT(t, 2*time.Minute)
	ver, err := clients[0].CompareAndSwap(ctx, "race/k", []byte("start"), 0)
	if err != nil {
		t.Fatal(err)
	}
	for r := 0; r < rounds; r++ {
		var wg sync.WaitGroup
		start := make(chan struct{})
		results := make([]error, writers)
		versions := make([]int64, writers)
		for i := 0; i < writers; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				<-start
				versions[i], results[i] = clients[i].CompareAndSwap(ctx, "race/k", []byte(fmt.Sprintf("r%d-w%d", r, i)), ver)
			}(i)
		}
		close(start)
		wg.Wait()
		winner := -1
		for i, err := range results {
			switch {
			case err == nil:
				if winner >= 0 {
					t.Fatalf("round %d: writers %d and %d both won", r, winner, i)
				}
				winner = i
			case errors.Is(err, store.ErrConflict):
			default:
				t.Fatalf("round %d writer %d: %v", r, i, err)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: nobody won", r)
		}
		kv, err := clients[0].Get(ctx, "race/k")
		if err != nil || string(kv.Value) != fmt.Sprintf("r%d-w%d", r, winner) || kv.Version != versions[winner] {
			t.Fatalf("round %d: stored %+v, %v; winner was %d at version %d", r, kv, err, winner, versions[winner])
		}
		ver = kv.Version
	}
}

func testTxn(t *testing.T, s store.Store) {
	ctx := ctxT(t, 30*time.Second)
	va := mustPut(t, s, "tx/a", "a0")
	vb := mustPut(t, s, "tx/b", "b0")
	// A transaction whose last condition fails changes nothing.
	err := s.Txn(ctx,
		store.Create("tx/new", []byte("n")),
		store.Update("tx/a", []byte("a1"), va),
		store.Put("tx/put", []byte("p")),
		store.Create("tx/b", []byte("exists already")),
	)
	wantKind(t, err, store.ErrConflict, "txn with a failing create")
	err = s.Txn(ctx, store.Create("tx/new", []byte("n")), store.Update("tx/a", []byte("a1"), va+1000))
	wantKind(t, err, store.ErrConflict, "txn with a stale update")
	err = s.Txn(ctx, store.Create("tx/new", []byte("n")), store.Delete("tx/gone", 1))
	wantKind(t, err, store.ErrConflict, "txn deleting a missing key")
	got, _ := s.List(ctx, "tx")
	if want := []string{"tx/a", "tx/b"}; !reflect.DeepEqual(keys(got), want) || string(got[0].Value) != "a0" || got[0].Version != va {
		t.Fatalf("after failed txns: %v (%+v), want only the untouched %v", keys(got), got, want)
	}
	// The same operations, all conditions true, land together.
	err = s.Txn(ctx,
		store.Create("tx/new", []byte("n")),
		store.Update("tx/a", []byte("a1"), va),
		store.Delete("tx/b", vb),
		store.Put("tx/put", []byte("p")),
	)
	if err != nil {
		t.Fatalf("good txn: %v", err)
	}
	got, _ = s.List(ctx, "tx")
	if want := []string{"tx/a", "tx/new", "tx/put"}; !reflect.DeepEqual(keys(got), want) || string(got[0].Value) != "a1" {
		t.Fatalf("after good txn: %v, want %v with a=a1", keys(got), want)
	}
	if got[0].Version == va {
		t.Fatalf("txn update did not change the version")
	}
}

func testTimeout(t *testing.T, s store.Store) {
	ctx, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	start := time.Now()
	_, err := s.Get(ctx, "to/k")
	wantKind(t, err, store.ErrTimeout, "get with an expired deadline")
	_, err = s.Put(ctx, "to/k", []byte("x"))
	wantKind(t, err, store.ErrTimeout, "put with an expired deadline")
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("expired-deadline calls took %s", d)
	}
}

// mirror applies watch events to a map, as every watch consumer does.
type mirror struct {
	mu     sync.Mutex
	state  map[string]store.KV
	resets int
	log    []store.Event
	cond   chan struct{}
}

func follow(t *testing.T, s store.Store, dir string) *mirror {
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := s.Watch(ctx, dir)
	if err != nil {
		cancel()
		t.Fatalf("watch %s: %v", dir, err)
	}
	m := &mirror{state: map[string]store.KV{}, cond: make(chan struct{})}
	done := make(chan struct{})
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("watch channel not closed 10s after its context ended")
		}
	})
	go func() {
		defer close(done)
		for ev := range ch {
			m.mu.Lock()
			m.log = append(m.log, ev)
			switch ev.Type {
			case store.EventReset:
				m.resets++
				m.state = map[string]store.KV{}
				for _, kv := range ev.Snapshot {
					m.state[kv.Key] = kv
				}
			case store.EventPut:
				m.state[ev.KV.Key] = ev.KV
			case store.EventDelete:
				delete(m.state, ev.KV.Key)
			}
			close(m.cond)
			m.cond = make(chan struct{})
			m.mu.Unlock()
		}
	}()
	return m
}

// waitFor waits until ok holds for the mirror's state.
func (m *mirror) waitFor(t *testing.T, d time.Duration, what string, ok func(map[string]store.KV) bool) {
	t.Helper()
	deadline := time.After(d)
	for {
		m.mu.Lock()
		good, wake := ok(m.state), m.cond
		m.mu.Unlock()
		if good {
			return
		}
		select {
		case <-wake:
		case <-deadline:
			m.mu.Lock()
			defer m.mu.Unlock()
			t.Fatalf("watch: %s not seen within %s; mirror has %d keys after %d events", what, d, len(m.state), len(m.log))
		}
	}
}

func (m *mirror) matches(t *testing.T, s store.Store, dir string, d time.Duration) {
	t.Helper()
	want, err := s.List(ctxT(t, 10*time.Second), dir)
	if err != nil {
		t.Fatal(err)
	}
	m.waitFor(t, d, "the store's current content", func(st map[string]store.KV) bool {
		if len(st) != len(want) {
			return false
		}
		for _, kv := range want {
			if got, ok := st[kv.Key]; !ok || string(got.Value) != string(kv.Value) {
				return false
			}
		}
		return true
	})
}

func hasValue(key, val string) func(map[string]store.KV) bool {
	return func(st map[string]store.KV) bool { kv, ok := st[key]; return ok && string(kv.Value) == val }
}

func absent(key string) func(map[string]store.KV) bool {
	return func(st map[string]store.KV) bool { _, ok := st[key]; return !ok }
}

// testWatchOrder: every change (paced) is seen, in order per key, nothing
// from outside the directory, and the first event is the snapshot.
func testWatchOrder(t *testing.T, b Backend, ns string) {
	s := b.Open(t, ns)
	mustPut(t, s, "w/pre", "before the watch")
	mustPut(t, s, "wx/outside", "x")
	m := follow(t, b.Open(t, ns), "w")
	m.waitFor(t, 10*time.Second, "the initial snapshot", hasValue("w/pre", "before the watch"))

	for i := 0; i < 5; i++ {
		for _, k := range []string{"w/k1", "w/sub/k2"} {
			val := fmt.Sprintf("%s=%d", k, i)
			mustPut(t, s, k, val)
			m.waitFor(t, 10*time.Second, val, hasValue(k, val))
		}
		mustPut(t, s, "wx/outside", fmt.Sprint(i))
	}
	if err := s.Delete(ctxT(t, 5*time.Second), "w/k1"); err != nil {
		t.Fatal(err)
	}
	m.waitFor(t, 10*time.Second, "delete of w/k1", absent("w/k1"))

	m.mu.Lock()
	defer m.mu.Unlock()
	if m.log[0].Type != store.EventReset {
		t.Fatalf("first event is %s, want reset", m.log[0].Type)
	}
	last := map[string]int{}
	for _, ev := range m.log {
		for _, kv := range append(ev.Snapshot, ev.KV) {
			if strings.HasPrefix(kv.Key, "wx") {
				t.Fatalf("watch of w reported %s", kv.Key)
			}
		}
		if ev.Type != store.EventPut {
			continue
		}
		_, num, _ := strings.Cut(string(ev.KV.Value), "=")
		n, _ := strconv.Atoi(num)
		if n < last[ev.KV.Key] {
			t.Fatalf("key %s went back from %d to %d", ev.KV.Key, last[ev.KV.Key], n)
		}
		last[ev.KV.Key] = n
	}
}

// testWatchBurst: writes faster than the watch reports may be coalesced,
// but a key never goes back and the mirror ends equal to the store.
func testWatchBurst(t *testing.T, b Backend, ns string) {
	s := b.Open(t, ns)
	m := follow(t, b.Open(t, ns), "burst")
	m.waitFor(t, 10*time.Second, "the initial snapshot", func(map[string]store.KV) bool { return m.resets > 0 })
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 25; i++ {
				if _, err := s.Put(context.Background(), fmt.Sprintf("burst/w%d", w), []byte(fmt.Sprintf("%03d", i))); err != nil {
					t.Errorf("put: %v", err)
					return
				}
				if i%5 == 4 {
					s.Delete(context.Background(), fmt.Sprintf("burst/extra%d-%d", w, i-1))
				} else {
					s.Put(context.Background(), fmt.Sprintf("burst/extra%d-%d", w, i), []byte("e"))
				}
			}
		}(w)
	}
	wg.Wait()
	m.matches(t, s, "burst", 20*time.Second)
	m.mu.Lock()
	defer m.mu.Unlock()
	last := map[string]string{}
	for _, ev := range m.log {
		if ev.Type == store.EventPut && strings.HasPrefix(ev.KV.Key, "burst/w") {
			if v := string(ev.KV.Value); v < last[ev.KV.Key] {
				t.Fatalf("%s went back from %s to %s", ev.KV.Key, last[ev.KV.Key], v)
			}
			last[ev.KV.Key] = string(ev.KV.Value)
		}
	}
}

// testWatchPartition: while a watching client is cut off from the store,
// another changes the directory. Once the link is back, the watch shows
// every change made meanwhile, whether it resumes with them as events or
// starts over with a fresh reset.
func testWatchPartition(t *testing.T, b Backend, ns string) {
	s := b.Open(t, ns)
	cut, link := b.Partitioned(t, ns)
	mustPut(t, s, "p/a", "1")
	mustPut(t, s, "p/b", "1")
	m := follow(t, cut, "p")
	m.waitFor(t, 10*time.Second, "the initial snapshot", hasValue("p/b", "1"))

	link.Cut()
	mustPut(t, s, "p/a", "2")
	if err := s.Delete(ctxT(t, 5*time.Second), "p/b"); err != nil {
		t.Fatal(err)
	}
	mustPut(t, s, "p/c", "3")
	time.Sleep(time.Second) // long enough for the client to notice
	link.Heal()

	m.waitFor(t, 30*time.Second, "the changes made while cut off", func(st map[string]store.KV) bool {
		return hasValue("p/a", "2")(st) && absent("p/b")(st) && hasValue("p/c", "3")(st)
	})
	m.matches(t, s, "p", 10*time.Second)
	m.mu.Lock()
	defer m.mu.Unlock()
	t.Logf("%d events after the first snapshot, %d of them resets", len(m.log)-1, m.resets-1)
}

func testRegisterRelease(t *testing.T, s store.Store, ttl time.Duration) {
	ctx := ctxT(t, 30*time.Second)
	reg, err := s.Register(ctx, "live/me", []byte("here"), max(ttl, 10*time.Second))
	if err != nil {
		t.Fatalf("register: %v", err)
	}
	kv, err := s.Get(ctx, "live/me")
	if err != nil || string(kv.Value) != "here" {
		t.Fatalf("registered key: %+v, %v", kv, err)
	}
	// It outlives twice its TTL while the owner lives (Consul keeps an
	// unrenewed session up to 2x TTL, so less would prove nothing).
	if b := 2*ttl + time.Second; ttl > 0 && b < 30*time.Second {
		time.Sleep(b)
		if _, err := s.Get(ctx, "live/me"); err != nil {
			t.Fatalf("registered key gone after %s while its owner lives: %v", b, err)
		}
	}
	if err := reg.Release(ctx); err != nil {
		t.Fatalf("release: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := s.Get(ctx, "live/me")
		if errors.Is(err, store.ErrNotFound) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("released key still there after 5s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// testRegisterIf: a registration that mayTakeOver refuses fails with
// ErrConflict and the refusal's reason, and leaves the holder's key alone;
// one it allows takes the key over, and the old holder's Release then
// leaves the new holder's key in place.
func testRegisterIf(t *testing.T, b Backend, ns string) {
	ctx := ctxT(t, time.Minute)
	ttl := max(b.LiveTTL, 10*time.Second)
	first, other, again := b.Open(t, ns), b.Open(t, ns), b.Open(t, ns)
	held := errors.New("held by the first owner")
	onlyOwn := func(cur []byte) error {
		if string(cur) != "first" && string(cur) != "first-again" {
			return fmt.Errorf("%w (%q)", held, cur)
		}
		return nil
	}
	notFirst := func(cur []byte) error {
		if string(cur) == "first" {
			return held
		}
		return nil
	}
	reg, err := first.RegisterIf(ctx, "live/id", []byte("first"), ttl, onlyOwn)
	if err != nil {
		t.Fatalf("register on an absent key: %v", err)
	}
	if _, err := other.RegisterIf(ctx, "live/id", []byte("other"), ttl, notFirst); !errors.Is(err, store.ErrConflict) || !errors.Is(err, held) {
		t.Fatalf("register over a refused holder: %v; want ErrConflict wrapping the refusal", err)
	}
	if kv, err := first.Get(ctx, "live/id"); err != nil || string(kv.Value) != "first" {
		t.Fatalf("after a refused register the key is %q, %v; want the holder's %q", kv.Value, err, "first")
	}
	again2, err := again.RegisterIf(ctx, "live/id", []byte("first-again"), ttl, onlyOwn)
	if err != nil {
		t.Fatalf("register over an allowed holder: %v", err)
	}
	if kv, err := first.Get(ctx, "live/id"); err != nil || string(kv.Value) != "first-again" {
		t.Fatalf("after taking over, the key is %q, %v; want %q", kv.Value, err, "first-again")
	}
	if err := reg.Release(ctx); err != nil {
		t.Fatalf("release of the displaced registration: %v", err)
	}
	time.Sleep(500 * time.Millisecond) // a wrong delete would show by now
	if kv, err := first.Get(ctx, "live/id"); err != nil || string(kv.Value) != "first-again" {
		t.Fatalf("the displaced registration's Release touched the new holder's key: %q, %v", kv.Value, err)
	}
	if err := again2.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := first.Get(ctx, "live/id"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the holder's Release left the key: %v", err)
	}
}

// testLiveness: a child process registers a key and is killed with
// SIGKILL; the key is gone within the backend's expiry bound.
func testLiveness(t *testing.T, b Backend, ns string) {
	s := b.Open(t, ns)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), childURL+"="+b.URL(ns), childKey+"=live/child", childTTL+"="+b.LiveTTL.String())
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "registered" {
		t.Fatalf("child did not register: %q, %v", line, err)
	}
	ctx := ctxT(t, 2*time.Minute)
	if _, err := s.Get(ctx, "live/child"); err != nil {
		t.Fatalf("child's key: %v", err)
	}
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for {
		_, err := s.Get(ctx, "live/child")
		if errors.Is(err, store.ErrNotFound) {
			t.Logf("dead owner's key vanished %s after SIGKILL (ttl %s, bound %s)", time.Since(killed).Round(time.Millisecond), b.LiveTTL, b.LiveExpiry)
			return
		}
		if time.Since(killed) > b.LiveExpiry {
			t.Fatalf("dead owner's key still there %s after SIGKILL (bound %s): %v", time.Since(killed), b.LiveExpiry, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// testRestart: the server stops mid-watch. Calls fail fast with
// ErrUnavailable/ErrTimeout naming the endpoint; after the restart calls work,
// the watch catches up, and a registered key is there again.
func testRestart(t *testing.T, b Backend, ns string) {
	s := b.Open(t, ns)
	m := follow(t, b.Open(t, ns), "r")
	mustPut(t, s, "r/before", "1")
	m.waitFor(t, 10*time.Second, "r/before", hasValue("r/before", "1"))
	ttl := b.LiveTTL
	if ttl == 0 {
		ttl = 10 * time.Second
	}
	if _, err := s.Register(ctxT(t, 5*time.Minute), "r/live", []byte("me"), ttl); err != nil {
		t.Fatal(err)
	}

	b.Server.Stop(t)
	stopped := true
	t.Cleanup(func() {
		if stopped {
			b.Server.Start(t)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	start := time.Now()
	_, err := s.Put(ctx, "r/during", []byte("x"))
	cancel()
	if !errors.Is(err, store.ErrUnavailable) && !errors.Is(err, store.ErrTimeout) {
		t.Fatalf("put while the server is down: %v, want store unavailable or timeout", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Fatalf("put while the server is down took %s; the deadline was 3s", d)
	}
	if !strings.Contains(err.Error(), strings.Split(s.Endpoint(), ",")[0]) {
		t.Errorf("error %q does not name the endpoint %s", err, s.Endpoint())
	}
	t.Logf("while down: %v (after %s)", err, time.Since(start).Round(time.Millisecond))

	b.Server.Start(t)
	stopped = false
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := s.Put(ctxT(t, 3*time.Second), "r/after", []byte("2"))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("store still failing 30s after restart: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := s.Delete(ctxT(t, 5*time.Second), "r/before"); err != nil {
		t.Fatal(err)
	}
	m.waitFor(t, 30*time.Second, "changes made after the restart", func(st map[string]store.KV) bool {
		return hasValue("r/after", "2")(st) && absent("r/before")(st)
	})
	m.matches(t, s, "r", 30*time.Second)
	deadline = time.Now().Add(2*ttl + 10*time.Second)
	for {
		kv, err := s.Get(ctxT(t, 3*time.Second), "r/live")
		if err == nil && string(kv.Value) == "me" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("registered key not back after the restart: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
