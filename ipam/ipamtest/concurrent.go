package ipamtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	dnpipam "github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// concSubnet is the pool every client of the concurrency tests shares:
// 1022 usable addresses, 3 x 300 of them held at once.
const concSubnet = "10.99.0.0/22"

// phaseTimeout bounds each phase of the concurrency tests.
const phaseTimeout = 3 * time.Minute

// worker is one host of the concurrency tests: it joins the shared pool,
// allocates, releases and leaves, keeping the list of what it holds.
type worker struct {
	d       *dnpipam.Driver
	pool    string
	gateway string
	held    []string // addresses without mask, in allocation order
}

// reply is what a worker reports after each step.
type reply struct {
	Error   string   `json:"error,omitempty"`
	Pool    string   `json:"pool,omitempty"`
	Gateway string   `json:"gateway,omitempty"`
	Held    []string `json:"held"`
}

// step runs one command: "start", "allocate N", "release-half", "finish".
func (w *worker) step(cmd string) reply {
	err := w.run(cmd)
	r := reply{Pool: w.pool, Gateway: w.gateway, Held: append([]string{}, w.held...)}
	if err != nil {
		r.Error = fmt.Sprintf("host %s, %s: %v", w.d.HostID(), cmd, err)
	}
	return r
}

func (w *worker) run(cmd string) error {
	name, arg, _ := strings.Cut(cmd, " ")
	switch name {
	case "start":
		res, err := w.d.RequestPool(context.Background(), &ipam.RequestPoolRequest{AddressSpace: dnpipam.LocalSpace, Pool: concSubnet})
		if err != nil {
			return err
		}
		w.pool = res.PoolID
		g, err := w.d.RequestAddress(context.Background(), &ipam.RequestAddressRequest{PoolID: w.pool, Options: gatewayOpts})
		if err != nil {
			return err
		}
		w.gateway = g.Address
		return nil
	case "allocate":
		n, err := strconv.Atoi(arg)
		if err != nil {
			return err
		}
		for range n {
			res, err := w.d.RequestAddress(context.Background(), &ipam.RequestAddressRequest{PoolID: w.pool})
			if err != nil {
				return err
			}
			w.held = append(w.held, ipOf(res.Address))
		}
		return nil
	case "release-half":
		var keep []string
		for i, a := range w.held {
			if i%2 == 1 {
				keep = append(keep, a)
				continue
			}
			if err := w.d.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: w.pool, Address: a}); err != nil {
				return err
			}
		}
		w.held = keep
		return nil
	case "finish":
		for len(w.held) > 0 {
			if err := w.d.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: w.pool, Address: w.held[0]}); err != nil {
				return err
			}
			w.held = w.held[1:]
		}
		if err := w.d.ReleaseAddress(context.Background(), &ipam.ReleaseAddressRequest{PoolID: w.pool, Address: ipOf(w.gateway)}); err != nil {
			return err
		}
		return w.d.ReleasePool(context.Background(), &ipam.ReleasePoolRequest{PoolID: w.pool})
	}
	return fmt.Errorf("unknown command %q", cmd)
}

// Concurrent runs the concurrency test with goroutines: clients hosts,
// each with its own store client, join one /22, request perClient
// addresses each at the same time, release half, request that many again,
// and leave. After every phase: zero duplicates, and the store holds
// exactly what the hosts hold (no leaks), each recorded under its holder.
func Concurrent(t *testing.T, b Backend, clients, perClient int) {
	e := newEnv(t, b)
	ws := make([]*worker, clients)
	counters := make([]*countingStore, clients)
	for i := range ws {
		counters[i] = &countingStore{Store: b.Open(t, e.ns), calls: map[string]int{}}
		ws[i] = &worker{d: dnpipam.New(counters[i], dnpipam.Options{HostID: fmt.Sprintf("host%d", i), Logger: quietLogger()})}
	}
	step := func(cmd string) []reply {
		before := make([]map[string]int, len(ws))
		for i, c := range counters {
			before[i] = c.snapshot()
		}
		out := make([]reply, len(ws))
		var wg sync.WaitGroup
		for i, w := range ws {
			wg.Add(1)
			go func() { defer wg.Done(); out[i] = w.step(cmd) }()
		}
		wg.Wait()
		// How hard the hosts contended: store calls per host in this step.
		for i, c := range counters {
			after := c.snapshot()
			t.Logf("  %s host%d store calls: txn %d, get %d, cas %d, list %d", cmd, i,
				after["txn"]-before[i]["txn"], after["get"]-before[i]["get"], after["cas"]-before[i]["cas"], after["list"]-before[i]["list"])
		}
		return out
	}
	runPhases(t, e, clients, perClient, step)
}

// runPhases drives the phases through step and checks the store after each.
func runPhases(t *testing.T, e *env, hosts, per int, step func(cmd string) []reply) {
	checker := e.host("checker")
	s := e.b.Open(t, e.ns)
	do := func(cmd string) []reply {
		t.Helper()
		start := time.Now()
		rs := step(cmd)
		for _, r := range rs {
			if r.Error != "" {
				t.Fatal(r.Error)
			}
		}
		t.Logf("%s: %d hosts in %s", cmd, hosts, time.Since(start).Round(time.Millisecond))
		return rs
	}
	rs := do("start")
	for _, r := range rs {
		if r.Pool != rs[0].Pool || r.Gateway != rs[0].Gateway {
			t.Fatalf("hosts disagree on pool or gateway: %+v vs %+v", r, rs[0])
		}
	}
	pool, gateway := rs[0].Pool, rs[0].Gateway
	check := func(rs []reply, want int) {
		t.Helper()
		checkHoldings(t, checker, pool, gateway, rs, want)
	}
	check(do(fmt.Sprintf("allocate %d", per)), per)
	check(do("release-half"), per/2)
	check(do(fmt.Sprintf("allocate %d", (per+1)/2)), per)
	do("finish")
	ctx := ctxT(t, time.Minute)
	if left, err := s.List(ctx, dnpipam.Dir); err != nil || len(left) != 0 {
		t.Fatalf("after every host left: %d keys remain (%v): %v", len(left), err, keys(left))
	}
}

// checkHoldings compares what every host says it holds with the store.
func checkHoldings(t *testing.T, checker *dnpipam.Driver, pool, gateway string, rs []reply, perHost int) {
	t.Helper()
	holder := map[string]string{}
	for i, r := range rs {
		host := fmt.Sprintf("host%d", i)
		if len(r.Held) != perHost {
			t.Fatalf("%s holds %d addresses, want %d", host, len(r.Held), perHost)
		}
		for _, a := range r.Held {
			if other, dup := holder[a]; dup {
				t.Fatalf("DUPLICATE: %s is held by %s and %s", a, other, host)
			}
			holder[a] = host
		}
	}
	list := allocations(t, checker, pool)
	stored := map[string]bool{}
	gateways := 0
	for _, rec := range list {
		if rec.Kind == dnpipam.KindGateway {
			gateways++
			if rec.Address != ipOf(gateway) || len(rec.Refs) != len(rs) {
				t.Fatalf("gateway record %+v, want %s held once by each of %d hosts", rec, gateway, len(rs))
			}
			continue
		}
		if holder[rec.Address] == "" {
			t.Fatalf("LEAK: %s is allocated in the store (by %s) but no host holds it", rec.Address, rec.Host)
		}
		if rec.Host != holder[rec.Address] {
			t.Fatalf("%s is recorded for %s but held by %s", rec.Address, rec.Host, holder[rec.Address])
		}
		stored[rec.Address] = true
	}
	for a, h := range holder {
		if !stored[a] {
			t.Fatalf("LOST: %s holds %s but the store has no allocation for it", h, a)
		}
	}
	if gateways != 1 || len(stored) != len(holder) {
		t.Fatalf("store has %d addresses and %d gateways; hosts hold %d", len(stored), gateways, len(holder))
	}
}

func keys(kvs []store.KV) []string {
	var out []string
	for _, kv := range kvs[:min(10, len(kvs))] {
		out = append(out, kv.Key)
	}
	return out
}

// Environment of a child process of Processes.
const (
	childURL  = "DNP_IPAMTEST_CHILD_URL"
	childHost = "DNP_IPAMTEST_CHILD_HOST"
)

// Main runs the tests or, in a child process Processes started, serves as
// one host of the concurrency test. Call it from TestMain.
func Main(m *testing.M, open Opener) {
	if url := os.Getenv(childURL); url != "" {
		os.Exit(child(url, os.Getenv(childHost), open))
	}
	os.Exit(m.Run())
}

// child reads commands from stdin, one a line, and answers each with one
// line of JSON on stdout.
func child(url, host string, open Opener) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	s, err := open(ctx, url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child: open:", err)
		return 2
	}
	defer s.Close()
	w := &worker{d: dnpipam.New(s, dnpipam.Options{HostID: host, Logger: quietLogger()})}
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		if err := out.Encode(w.step(in.Text())); err != nil {
			fmt.Fprintln(os.Stderr, "child: write:", err)
			return 2
		}
	}
	return 0
}

// proc is one child process of Processes.
type proc struct {
	cmd    *exec.Cmd
	stdin  *os.File
	lines  chan []byte
	stderr *syncWriter
}

// Processes is Concurrent with separate OS processes, each with its own
// store client (the test binary started again; its TestMain must call
// Main). It needs Backend.URL.
func Processes(t *testing.T, b Backend, procs, perProc int) {
	e := newEnv(t, b)
	url := b.URL(e.ns)
	ps := make([]*proc, procs)
	for i := range ps {
		ps[i] = startChild(t, url, fmt.Sprintf("host%d", i))
	}
	step := func(cmd string) []reply {
		for _, p := range ps {
			if _, err := fmt.Fprintln(p.stdin, cmd); err != nil {
				t.Fatalf("send %q to child: %v; stderr:\n%s", cmd, err, p.stderr)
			}
		}
		out := make([]reply, len(ps))
		for i, p := range ps {
			select {
			case line, ok := <-p.lines:
				if !ok {
					t.Fatalf("child %d exited during %q (does TestMain call ipamtest.Main?); stderr:\n%s", i, cmd, p.stderr)
				}
				if err := json.Unmarshal(line, &out[i]); err != nil {
					t.Fatalf("child %d answered %q to %q (does TestMain call ipamtest.Main?): %v; stderr:\n%s", i, line, cmd, err, p.stderr)
				}
			case <-time.After(phaseTimeout):
				t.Fatalf("child %d did not finish %q within %s; stderr:\n%s", i, cmd, phaseTimeout, p.stderr)
			}
		}
		return out
	}
	runPhases(t, e, procs, perProc, step)
}

func startChild(t *testing.T, url, host string) *proc {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childURL+"="+url, childHost+"="+host)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	inR, inW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, stdin: inW, lines: make(chan []byte, 64), stderr: &syncWriter{}}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start child: %v", err)
	}
	inR.Close()
	outW.Close()
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(outR)
		sc.Buffer(make([]byte, 1<<16), 1<<24)
		for sc.Scan() {
			p.lines <- append([]byte(nil), sc.Bytes()...)
		}
	}()
	t.Cleanup(func() {
		inW.Close() // the child exits at end of input
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		outR.Close()
	})
	return p
}

// syncWriter keeps the child's stderr; it may be read while written.
type syncWriter struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *syncWriter) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(b)
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}
