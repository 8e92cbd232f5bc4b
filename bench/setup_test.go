package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/guest"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// Runs is how many times each case and its baseline are measured.
const Runs = 5

// pluginName is the legacy plugin's name on every host (-d, --ipam-driver).
const pluginName = harness.PluginName

// needBench skips a benchmark unless DNP_BENCH=1: they take minutes, need
// root, Docker and iperf3, and are not part of `make test`.
func needBench(t *testing.T) {
	t.Helper()
	if os.Getenv("DNP_BENCH") != "1" {
		t.Skip("benchmark: runs only with DNP_BENCH=1 (make bench)")
	}
	testenv.NeedRoot(t)
}

// outDir is where results go: DNP_BENCH_OUT, else /tmp/dnp-bench-results.
func outDir() string {
	if d := os.Getenv("DNP_BENCH_OUT"); d != "" {
		return d
	}
	return "/tmp/dnp-bench-results"
}

// recorder collects one benchmark's Result and saves it when done.
type recorder struct {
	t     *testing.T
	res   Result
	start time.Time
}

func newRecorder(t *testing.T, id string) *recorder {
	for _, e := range Expected {
		if e.ID == id {
			la, _ := os.ReadFile("/proc/loadavg")
			return &recorder{t: t, start: time.Now(), res: Result{
				ID: id, Order: e.Order, Title: e.Title, LoadAvg: strings.Join(strings.Fields(string(la))[:3], " "),
				RunAlone: fmt.Sprintf("DNP_BENCH=1 go test -count=1 -timeout 15m -v -run '^%s$' ./bench/", t.Name()),
			}}
		}
	}
	t.Fatalf("benchmark %q is not in bench.Expected", id)
	return nil
}

func (r *recorder) note(format string, args ...any) {
	r.res.Notes = append(r.res.Notes, fmt.Sprintf(format, args...))
}

// save writes the result and logs its table, so a benchmark run alone
// shows its numbers too.
func (r *recorder) save() {
	r.t.Helper()
	r.res.Seconds = time.Since(r.start).Seconds()
	r.res.Finished = time.Now().UTC().Format(time.RFC3339)
	var b strings.Builder
	writeSection(&b, r.res)
	r.t.Logf("result:\n%s", b.String())
	if err := Save(outDir(), r.res); err != nil {
		r.t.Fatal(err)
	}
	r.t.Logf("saved %s/%s.json", outDir(), r.res.ID)
}

// pluginProc is the plugin running as a legacy plugin on one host.
type pluginProc = harness.LegacyPlugin

// startPlugin runs the plugin on h (bin/docker-net-plugin when make bench
// sets DNP_PLUGIN_BIN), logging at info.
func startPlugin(t *testing.T, c *harness.Cluster, h *harness.Host, storeURL string) *pluginProc {
	t.Helper()
	return harness.StartLegacyPlugin(t, c, h, storeURL, "--log-level", "info")
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// benchCluster is a harness cluster with a store and the plugin on every host.
type benchCluster struct {
	*harness.Cluster
	StoreURL string
	Plugins  []*pluginProc
}

// newCluster starts n Docker hosts, an etcd server on the underlay (in the
// test's own namespace) and the plugin on every host. At the end the
// containers and networks are removed and the plugins stopped while the
// store still runs (its own cleanup comes before the cluster's teardown).
func newCluster(t *testing.T, n int) *benchCluster {
	t.Helper()
	return newClusterOpts(t, n, harness.Options{})
}

// newClusterOpts is newCluster with harness options.
func newClusterOpts(t *testing.T, n int, opts harness.Options) *benchCluster {
	t.Helper()
	return newClusterOn(t, n, "etcd", opts)
}

// newClusterOn is newClusterOpts with a store of kind etcd, consul or zk
// (one server, on the underlay).
func newClusterOn(t *testing.T, n int, kind string, opts harness.Options) *benchCluster {
	t.Helper()
	if guest.Inside() {
		opts.ReadyTimeout = 3 * time.Minute // the test guest is an emulated machine
	}
	c := harness.New(t, n, opts)
	if err := c.AttachRoot(); err != nil {
		t.Fatal(err)
	}
	srv := testenv.StartServer(t, kind, testenv.ServerOptions{IP: c.RootIP})
	bc := &benchCluster{Cluster: c, StoreURL: srv.URL("dnp-" + c.ID)}
	for _, h := range c.Hosts {
		bc.Plugins = append(bc.Plugins, startPlugin(t, c, h, bc.StoreURL))
	}
	// Registered after the store's own cleanup, so it runs before it.
	t.Cleanup(func() {
		for _, h := range c.Hosts {
			emptyHost(h)
		}
		for _, p := range bc.Plugins {
			p.Stop()
		}
	})
	return bc
}

// emptyHost removes every container and user network of h.
func emptyHost(h *harness.Host) {
	if ids, err := h.Docker("ps", "-aq"); err == nil && ids != "" {
		h.Docker(append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
	}
	if ids, err := h.Docker("network", "ls", "-q", "--filter", "type=custom"); err == nil && ids != "" {
		h.Docker(append([]string{"network", "rm"}, strings.Fields(ids)...)...)
	}
}

// overlayNetwork creates a Docker network of the plugin on h, part of the
// cluster-wide overlay name.
func overlayNetwork(t *testing.T, h *harness.Host, name, subnet string, extra ...string) {
	t.Helper()
	args := append([]string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName,
		"--subnet", subnet, "-o", "overlay=" + name}, extra...)
	h.MustDocker(t, append(args, name)...)
}

// runContainer starts a long-lived container and returns its address on network.
func runContainer(t *testing.T, h *harness.Host, name, network string, extra ...string) string {
	t.Helper()
	args := append([]string{"run", "-d", "--init", "--name", name, "--network", network}, extra...)
	h.MustDocker(t, append(args, harness.Image, "sleep", "3600")...)
	ip := h.MustDocker(t, "inspect", "-f", "{{(index .NetworkSettings.Networks \""+network+"\").IPAddress}}", name)
	if net.ParseIP(ip) == nil {
		t.Fatalf("container %s on %s has no IPv4 address: %q", name, network, ip)
	}
	return ip
}

// containerNetNS is the path of a running container's network namespace.
func containerNetNS(t *testing.T, h *harness.Host, name string) string {
	t.Helper()
	pid := h.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", name)
	if n, err := strconv.Atoi(pid); err != nil || n <= 0 {
		t.Fatalf("container %s: pid %q", name, pid)
	}
	return "/proc/" + pid + "/ns/net"
}

// setARPRetrans sets how often the kernel of namespace ns re-asks ARP for
// an unresolved address on dev (default 1 s, which would hide everything
// faster than that in a convergence measurement).
func setARPRetrans(ns, dev string, ms int) error {
	return harness.DoIn(ns, func() error {
		path := "/proc/sys/net/ipv4/neigh/" + dev + "/retrans_time_ms"
		if err := os.WriteFile(path, []byte(strconv.Itoa(ms)), 0o644); err != nil {
			return fmt.Errorf("set %s: %w", path, err)
		}
		return nil
	})
}

// ms is d in milliseconds.
func ms(d time.Duration) float64 { return d.Seconds() * 1000 }

func numCPU() int { return runtime.NumCPU() }

// timed runs fn and returns its wall time.
func timed(fn func() error) (time.Duration, error) {
	start := time.Now()
	err := fn()
	return time.Since(start), err
}

// ---- ICMP echo, for convergence ----

// pinger sends ICMP echo requests from a raw socket opened in a network
// namespace (a container's), so no ping process runs per attempt.
type pinger struct {
	conn *net.IPConn
}

func newPinger(ns string) (*pinger, error) {
	var conn *net.IPConn
	err := harness.DoIn(ns, func() error {
		c, err := net.ListenIP("ip4:icmp", &net.IPAddr{IP: net.IPv4zero})
		if err != nil {
			return fmt.Errorf("raw ICMP socket: %w", err)
		}
		conn = c
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &pinger{conn: conn}, nil
}

func (p *pinger) Close() error { return p.conn.Close() }

// firstReply sends an echo request to dst every interval until the first
// reply comes back, and returns when it arrived. It gives up after timeout.
func (p *pinger) firstReply(dst net.IP, interval, timeout time.Duration) (time.Time, error) {
	id := uint16(rand.UintN(1 << 16))
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		for seq := uint16(1); ; seq++ {
			// Errors (no route yet, neighbour unresolved) just mean: not yet.
			p.conn.WriteTo(echoRequest(id, seq), &net.IPAddr{IP: dst})
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for {
		if err := p.conn.SetReadDeadline(deadline); err != nil {
			return time.Time{}, err
		}
		n, from, err := p.conn.ReadFrom(buf)
		if err != nil {
			return time.Time{}, fmt.Errorf("no echo reply from %s within %s: %w", dst, timeout, err)
		}
		at := time.Now()
		ip, ok := from.(*net.IPAddr)
		if n >= 8 && buf[0] == 0 && ok && ip.IP.Equal(dst) && binary.BigEndian.Uint16(buf[4:]) == id {
			return at, nil
		}
	}
}

// echoRequest is an ICMP echo request with 8 bytes of payload.
func echoRequest(id, seq uint16) []byte {
	b := make([]byte, 16)
	b[0] = 8 // echo request
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	binary.BigEndian.PutUint64(b[8:], uint64(time.Now().UnixNano()))
	binary.BigEndian.PutUint16(b[2:], checksum(b))
	return b
}

func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// ---- TCP request/response ----

const rrPort = 7101

// tcpRR measures one-byte request/response transactions per second over
// one TCP connection from namespace clientNS to addr:rrPort, answered by an
// echo server in namespace serverNS (both run in this process, like
// netperf's TCP_RR).
func tcpRR(serverNS, clientNS, addr string, d time.Duration) (float64, error) {
	var l net.Listener
	if err := harness.DoIn(serverNS, func() error {
		var err error
		l, err = net.Listen("tcp4", ":"+strconv.Itoa(rrPort))
		return err
	}); err != nil {
		return 0, fmt.Errorf("tcp rr listen: %w", err)
	}
	defer l.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		b := make([]byte, 1)
		for {
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			if _, err := c.Write(b); err != nil {
				return
			}
		}
	}()
	var conn net.Conn
	if err := harness.DoIn(clientNS, func() error {
		var err error
		conn, err = net.DialTimeout("tcp4", net.JoinHostPort(addr, strconv.Itoa(rrPort)), 5*time.Second)
		return err
	}); err != nil {
		return 0, fmt.Errorf("tcp rr dial %s: %w", addr, err)
	}
	conn.SetDeadline(time.Now().Add(d + 10*time.Second))
	b := []byte{'x'}
	n := 0
	start := time.Now()
	end := start.Add(d)
	for time.Now().Before(end) {
		if _, err := conn.Write(b); err != nil {
			conn.Close()
			return 0, fmt.Errorf("tcp rr: %w", err)
		}
		if _, err := io.ReadFull(conn, b); err != nil {
			conn.Close()
			return 0, fmt.Errorf("tcp rr: %w", err)
		}
		n++
	}
	elapsed := time.Since(start)
	conn.Close()
	<-served
	if n == 0 {
		return 0, errors.New("tcp rr: no transaction completed")
	}
	return float64(n) / elapsed.Seconds(), nil
}
