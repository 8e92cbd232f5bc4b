package metrics_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/dnplabs/docker-net-plugin/internal/metrics"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/bolt"
	"github.com/dnplabs/docker-net-plugin/store/etcd"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
)

func TestMain(m *testing.M) { storetest.Main(m, instrumented(metrics.New())) }

// instrumented opens bolt stores instrumented by m.
func instrumented(m *metrics.Metrics) storetest.Opener {
	return func(ctx context.Context, cfg store.Config) (store.Store, error) {
		s, err := bolt.Open(ctx, cfg)
		if err != nil {
			return nil, err
		}
		return m.Store(s), nil
	}
}

// The instrumented store is still a store: it passes the conformance suite.
func TestInstrumentedStoreConforms(t *testing.T) {
	m := metrics.New()
	storetest.Run(t, storetest.NewBackend("bolt+metrics", instrumented(m), storetest.Files(t.TempDir())))
	got := scrape(t, m)
	if got[`dnp_store_operation_duration_seconds_count{op="put"}`] == 0 || got[`dnp_store_errors_total{kind="conflict",op="cas"}`] == 0 {
		t.Errorf("the suite's puts and CAS conflicts were not counted: %v", got)
	}
}

// scrape serves the metrics over real HTTP on loopback and parses the
// text format into "name{labels}" -> value.
func scrape(t *testing.T, m *metrics.Metrics) map[string]float64 {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, err := m.Serve(ctx, "127.0.0.1:0", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func TestCountsWhatHappened(t *testing.T) {
	m := metrics.New()
	s := storetest.Open(t, instrumented(m), store.Config{URL: storetest.Files(t.TempDir())("s")})
	ctx := testenv.Context(t, 10*time.Second)

	if _, err := s.Get(ctx, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get of a missing key: %v", err)
	}
	v, err := s.Put(ctx, "a", []byte("1"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CompareAndSwap(ctx, "a", []byte("2"), v+100); !errors.Is(err, store.ErrConflict) {
		t.Fatalf("cas with a wrong version: %v", err)
	}
	if _, err := s.CompareAndSwap(ctx, "a", []byte("2"), v); err != nil {
		t.Fatal(err)
	}
	if err := s.Txn(ctx, store.Put("b", []byte("x")), store.Put("c", []byte("y"))); err != nil {
		t.Fatal(err)
	}
	if kvs, err := s.List(ctx, ""); err == nil {
		t.Fatalf("list of an invalid dir returned %v", kvs)
	}
	m.PluginCall("NetworkDriver.Join", 3*time.Millisecond, nil)
	m.PluginCall("NetworkDriver.Join", 5*time.Millisecond, nil)
	m.PluginCall("NetworkDriver.CreateNetwork", time.Millisecond, errors.New("boom"))
	m.Reconciled(4, nil)
	m.Reconciled(0, errors.New("store away"))
	m.Known(2, 5, 3)
	m.Skipped(0, 2)

	got := scrape(t, m)
	want := map[string]float64{
		`dnp_store_operation_duration_seconds_count{op="get"}`:                             1,
		`dnp_store_operation_duration_seconds_count{op="put"}`:                             1,
		`dnp_store_operation_duration_seconds_count{op="cas"}`:                             2,
		`dnp_store_operation_duration_seconds_count{op="txn"}`:                             1,
		`dnp_store_operation_duration_seconds_count{op="list"}`:                            1,
		`dnp_store_errors_total{kind="not_found",op="get"}`:                                1,
		`dnp_store_errors_total{kind="conflict",op="cas"}`:                                 1,
		`dnp_store_errors_total{kind="invalid",op="list"}`:                                 1,
		`dnp_plugin_calls_total{method="NetworkDriver.Join",result="ok"}`:                  2,
		`dnp_plugin_calls_total{method="NetworkDriver.CreateNetwork",result="error"}`:      1,
		`dnp_plugin_call_duration_seconds_count{method="NetworkDriver.Join"}`:              2,
		`dnp_plugin_call_duration_seconds_bucket{method="NetworkDriver.Join",le="0.0025"}`: 0,
		`dnp_plugin_call_duration_seconds_bucket{method="NetworkDriver.Join",le="0.005"}`:  2,
		`dnp_reconcile_runs_total{result="ok"}`:                                            1,
		`dnp_reconcile_runs_total{result="error"}`:                                         1,
		`dnp_reconcile_changes_total`:                                                      4,
		`dnp_endpoints_known{location="local"}`:                                            2,
		`dnp_endpoints_known{location="remote"}`:                                           5,
		`dnp_hosts_known`:                                                                  3,
		`dnp_endpoint_records_skipped{reason="invalid"}`:                                   0,
		`dnp_endpoint_records_skipped{reason="conflict"}`:                                  2,
	}
	for k, v := range want {
		if g, ok := got[k]; !ok || g != v {
			t.Errorf("%s = %v (present %v), want %v", k, g, ok, v)
		}
	}
	if _, ok := got[`dnp_store_errors_total{kind="not_found",op="put"}`]; ok {
		t.Errorf("an error was counted for an operation that succeeded")
	}
	if got["go_goroutines"] == 0 || got["process_open_fds"] == 0 {
		t.Errorf("Go runtime and process metrics missing")
	}
}

// A watch that has to re-read its directory sends a second reset: that is
// one reconnect. The first reset, which every watch starts with, is not,
// nor is an outage the watch resumes from without re-reading (etcd keeps
// the history across a server restart); an outage during which that
// history was compacted is.
func TestWatchReconnectsCounted(t *testing.T) {
	srv := testenv.StartEtcd(t, testenv.ServerOptions{})
	p := testenv.StartProxy(t, srv.Addr)
	raw, err := etcd.Open(context.Background(), store.Config{URL: "etcd://" + p.Addr() + "/m"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	m := metrics.New()
	s := m.Store(raw)
	ctx := testenv.Context(t, 2*time.Minute)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	ch, err := s.Watch(wctx, "dir")
	if err != nil {
		t.Fatal(err)
	}
	next := func(what string) store.Event {
		t.Helper()
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("watch closed while waiting for %s", what)
			}
			return ev
		case <-time.After(60 * time.Second):
			t.Fatalf("no %s within 60s", what)
		}
		return store.Event{}
	}
	reconnects := func() float64 { return scrape(t, m)[`dnp_store_watch_reconnects_total{dir="dir"}`] }
	if ev := next("the first reset"); ev.Type != store.EventReset {
		t.Fatalf("first event %v, want reset", ev.Type)
	}
	if _, err := s.Put(ctx, "dir/a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	if ev := next("the put"); ev.Type != store.EventPut {
		t.Fatalf("event %v, want put", ev.Type)
	}
	if got := reconnects(); got != 0 {
		t.Fatalf("reconnects %v before any reconnect", got)
	}

	srv.Stop(t)
	srv.Start(t)
	if _, err := s.Put(ctx, "dir/a", []byte("2")); err != nil {
		t.Fatal(err)
	}
	if ev := next("the put after the restart"); ev.Type != store.EventPut || string(ev.KV.Value) != "2" {
		t.Fatalf("after the restart: %v %+v, want the put of dir/a=2", ev.Type, ev.KV)
	}
	if got := reconnects(); got != 0 {
		t.Fatalf("reconnects %v after a restart the watch resumed from, want 0", got)
	}

	other, err := etcd.Open(context.Background(), store.Config{URL: srv.URL("m")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close() })
	p.Cut()
	// Compacting at the current revision keeps that revision's change:
	// write two, so that the first is lost.
	for _, v := range []string{"3", "4"} {
		if _, err := other.Put(ctx, "dir/a", []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	compact(t, srv)
	p.Heal()
	for {
		if ev := next("the reset after the compaction"); ev.Type == store.EventReset {
			break
		}
	}
	if got := reconnects(); got != 1 {
		t.Errorf("reconnects %v after one re-read, want 1", got)
	}

	// Ending the watch closes the instrumented channel too.
	stop()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-deadline:
			t.Fatal("watch channel still open 10s after its context ended")
		}
	}
}

// compact compacts srv's history up to its current revision, as an
// operator (or etcd's auto-compaction) would.
func compact(t *testing.T, srv *testenv.Server) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + srv.Addr}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := testenv.Context(t, 10*time.Second)
	resp, err := cli.Get(ctx, "compact")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
}
