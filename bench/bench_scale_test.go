package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// Simulated remote hosts: this many live host keys, their endpoints spread
// over them round robin.
const simHosts = 100

// The store records the driver reads (driver/records.go: endpoints/<overlay>/<id>
// and hosts/<host>), written here as remote hosts would.
type simEndpoint struct {
	Network string `json:"network"`
	Host    string `json:"host"`
	IPv4    string `json:"ipv4"`
	MAC     string `json:"mac"`
}

type simHost struct {
	Addr    string `json:"addr"`
	Name    string `json:"name"`
	Started string `json:"started"`
}

// TestBenchScale: time and plugin memory to program 1,000 and 10,000
// remote endpoints on one host, and the time one change takes at that size.
func TestBenchScale(t *testing.T) {
	needBench(t)
	sizes := []int{1000, 10000}
	rec := newRecorder(t, "scale")
	rec.res.Measures = fmt.Sprintf("one Docker host runs the plugin (etcd store) with one local container on an overlay; "+
		"remote hosts are simulated as store entries: %d live host keys and N endpoint records spread over them, "+
		"written as remote plugins would (transactions of %d keys, 4 writers). "+
		"Program time: from the first write until the host's overlay namespace holds all N static neighbour entries "+
		"(with their forwarding entries; polled every 20 ms). RSS: the plugin process's VmRSS right after. "+
		"One change: one more endpoint record written at that size, until its neighbour entry exists (netlink event). "+
		"Between runs all N records are deleted and the host waits until the entries are gone.", simHosts, store.MaxTxnOps)
	rec.res.Baseline = "program time: the same N peers written by one direct call of the data plane " +
		"(package overlay, SetPeers) into a scratch overlay on the same host, without store or watch: the kernel's share. " +
		"RSS and one change: the same measurement with no remote endpoints, taken first (5 runs)."
	c := newCluster(t, 1)
	h := c.Hosts[0]
	plugin := c.Plugins[0]
	if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", plugin.Pid())); err != nil || filepath.Base(exe) != "docker-net-plugin" {
		t.Fatalf("pid %d is not the plugin (exe %q, %v)", plugin.Pid(), exe, err)
	}
	overlayNetwork(t, h, "scale", "10.90.0.0/16")
	runContainer(t, h, "local", "scale")
	nsPath := overlayNS(t, c.Cluster, h)
	kernel := openNeighCounter(t, nsPath)

	ctx := context.Background()
	st, err := stores.Open(ctx, store.Config{URL: c.StoreURL})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })

	sub, err := netip.ParsePrefix(c.Subnet)
	if err != nil {
		t.Fatal(err)
	}
	hostAddr := func(i int) netip.Addr {
		b := sub.Addr().As4()
		b[3] = byte(100 + i%simHosts)
		return netip.AddrFrom4(b)
	}
	for i := range simHosts {
		a := hostAddr(i).String()
		rec := simHost{Addr: a, Name: "sim-" + strconv.Itoa(i), Started: time.Now().UTC().Format(time.RFC3339)}
		if _, err := st.Put(ctx, "hosts/"+a, mustJSON(rec)); err != nil {
			t.Fatal(err)
		}
	}
	endpoint := func(i int) (string, simEndpoint, overlay.Peer) {
		ip := netip.AddrFrom4([4]byte{10, 90, byte(1 + i/256), byte(i % 256)})
		mac := net.HardwareAddr{0x02, 0xbe, 0x00, byte(i >> 16), byte(i >> 8), byte(i)}
		key := fmt.Sprintf("endpoints/scale/sim-%06d", i)
		return key, simEndpoint{Network: "sim", Host: hostAddr(i).String(), IPv4: ip.String() + "/16", MAC: mac.String()},
			overlay.Peer{HostIP: hostAddr(i), MAC: mac, IPs: []netip.Addr{ip}}
	}
	write := func(from, to int) error {
		var ops []store.Op
		for i := from; i < to; i++ {
			key, ep, _ := endpoint(i)
			ops = append(ops, store.Put(key, mustJSON(ep)))
		}
		return txnBatches(ctx, st, ops)
	}
	removeAll := func() error {
		kvs, err := st.List(ctx, "endpoints/scale")
		if err != nil {
			return err
		}
		var ops []store.Op
		for _, kv := range kvs {
			if strings.Contains(kv.Key, "/sim-") {
				ops = append(ops, store.Delete(kv.Key, kv.Version))
			}
		}
		if err := txnBatches(ctx, st, ops); err != nil {
			return err
		}
		_, err = kernel.waitCount(0, 2*time.Minute)
		return err
	}
	oneChange := func(i int) (float64, error) {
		key, ep, _ := endpoint(i)
		ip := strings.TrimSuffix(ep.IPv4, "/16")
		events, err := watchNeigh(nsPath)
		if err != nil {
			return 0, err
		}
		defer events.Close()
		start := time.Now()
		if _, err := st.Put(ctx, key, mustJSON(ep)); err != nil {
			return 0, err
		}
		at, err := events.wait(ip, time.Minute)
		if err != nil {
			return 0, err
		}
		return ms(at.Sub(start)), nil
	}
	rss := func() float64 {
		v, err := rssMiB(plugin.Pid())
		if err != nil {
			t.Fatal(err)
		}
		return v
	}

	// Baselines with no remote endpoint.
	var idleRSS, change0 []float64
	for run := range Runs {
		idleRSS = append(idleRSS, rss())
		v, err := oneChange(0)
		if err != nil {
			t.Fatalf("run %d: one change at size 0: %v", run+1, err)
		}
		change0 = append(change0, v)
		if err := removeAll(); err != nil {
			t.Fatal(err)
		}
	}

	// The scratch overlay for the direct data-plane baseline.
	direct := &overlay.Host{NetNS: h.NetNS, Prefix: c.Prefix + "-b1-"}
	ovn, err := direct.EnsureNetwork(overlay.NetworkConfig{ID: "1", VNI: 99, Encap: overlay.EncapVXLAN,
		LocalIP: netip.MustParseAddr(h.UnderlayIP)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := direct.DeleteNetwork("1"); err != nil {
			t.Errorf("remove scratch overlay: %v", err)
		}
	})

	var writeNotes []string
	for _, n := range sizes {
		var prog, base, mem, change, writes []float64
		peers := make([]overlay.Peer, n)
		for i := range n {
			_, _, peers[i] = endpoint(i)
		}
		for run := range Runs {
			start := time.Now()
			if err := write(0, n); err != nil {
				t.Fatalf("size %d run %d: write: %v", n, run+1, err)
			}
			wrote := time.Since(start)
			at, err := kernel.waitCount(n, 5*time.Minute)
			if err != nil {
				t.Fatalf("size %d run %d: %v", n, run+1, err)
			}
			prog = append(prog, at.Sub(start).Seconds())
			writes = append(writes, wrote.Seconds())
			if run == 0 {
				// The forwarding entries are there too: one per endpoint
				// and one all-zero entry per remote host.
				if fdb, err := kernel.countFDB(); err != nil || fdb != n+simHosts {
					t.Errorf("size %d: %d VXLAN forwarding entries (%v), want %d", n, fdb, err, n+simHosts)
				}
			}
			mem = append(mem, rss())
			v, err := oneChange(n)
			if err != nil {
				t.Fatalf("size %d run %d: one change: %v", n, run+1, err)
			}
			change = append(change, v)
			if err := removeAll(); err != nil {
				t.Fatalf("size %d run %d: remove: %v", n, run+1, err)
			}

			d, err := timed(func() error { _, err := ovn.SetPeers(peers, nil); return err })
			if err != nil {
				t.Fatalf("size %d run %d: direct SetPeers: %v", n, run+1, err)
			}
			base = append(base, d.Seconds())
			if _, err := ovn.SetPeers(nil, nil); err != nil {
				t.Fatal(err)
			}
			t.Logf("size %d run %d: programmed in %.2f s (store writes %.2f s), direct %.2f s; RSS %.1f MiB; one change %.1f ms",
				n, run+1, prog[run], wrote.Seconds(), base[run], mem[run], change[run])
		}
		label := formatCount(n)
		writeNotes = append(writeNotes, fmt.Sprintf("%s s for %s endpoints", FormatNumber(Summarize(writes).Median), label))
		rec.res.Rows = append(rec.res.Rows,
			Row{Name: "program " + label + " remote endpoints (store to kernel)", Unit: "s", Samples: prog,
				BaseName: "direct SetPeers of the same " + label, Base: base},
			Row{Name: "plugin RSS with " + label + " remote endpoints", Unit: "MiB", Samples: mem,
				BaseName: "plugin RSS, no remote endpoints", Base: idleRSS},
			Row{Name: "one change applied with " + label + " programmed", Unit: "ms", Samples: change,
				BaseName: "one change, no remote endpoints", Base: change0},
		)
	}
	rec.note("Of the program time, the store writes alone took (median) %s.", strings.Join(writeNotes, ", "))
	rec.note("Each remote endpoint is three kernel entries: a VXLAN forwarding entry (MAC to remote host), a static bridge "+
		"entry and a permanent neighbour entry; plus one all-zero forwarding entry per remote host (%d).", simHosts)
	rec.note("Every change waits for the plugin's short debounce of store events (driver/peers.go) before it is programmed.")
	rec.note("A change makes the plugin re-read the overlay's tables from the kernel and compare them with the store's view, " +
		"which is why its cost grows with the number of entries.")
	rec.save()
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func formatCount(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// txnBatches applies ops in transactions of store.MaxTxnOps, four at a time.
func txnBatches(ctx context.Context, st store.Store, ops []store.Op) error {
	var batches [][]store.Op
	for len(ops) > 0 {
		n := min(len(ops), store.MaxTxnOps)
		batches = append(batches, ops[:n])
		ops = ops[n:]
	}
	work := make(chan []store.Op)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for w := range errs {
		wg.Go(func() {
			for b := range work {
				if errs[w] != nil {
					continue
				}
				tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				errs[w] = st.Txn(tctx, b...)
				cancel()
			}
		})
	}
	for _, b := range batches {
		work <- b
	}
	close(work)
	wg.Wait()
	return errors.Join(errs...)
}

// rssMiB is the resident set size of process pid.
func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest) // "12345 kB"
			kb, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS %q: %w", rest, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// neighCounter counts the permanent IPv4 neighbour entries on the bridge of
// an overlay namespace (one per remote endpoint address).
type neighCounter struct {
	h            *netlink.Handle
	brIdx, vxIdx int
}

func openNeighCounter(t *testing.T, nsPath string) *neighCounter {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	br, err := h.LinkByName("br0")
	if err != nil {
		t.Fatalf("bridge in %s: %v", nsPath, err)
	}
	vx, err := h.LinkByName("vxlan0")
	if err != nil {
		t.Fatalf("vxlan device in %s: %v", nsPath, err)
	}
	return &neighCounter{h: h, brIdx: br.Attrs().Index, vxIdx: vx.Attrs().Index}
}

// countFDB counts the VXLAN device's own forwarding entries.
func (c *neighCounter) countFDB() (int, error) {
	list, err := c.h.NeighList(c.vxIdx, unix.AF_BRIDGE)
	if err != nil {
		return 0, fmt.Errorf("list forwarding entries: %w", err)
	}
	n := 0
	for _, e := range list {
		if e.Flags&netlink.NTF_SELF != 0 && e.IP != nil {
			n++
		}
	}
	return n, nil
}

func (c *neighCounter) count() (int, error) {
	for try := 0; ; try++ {
		list, err := c.h.NeighList(c.brIdx, unix.AF_INET)
		if errors.Is(err, netlink.ErrDumpInterrupted) && try < 10 {
			continue // the table changed during the dump
		}
		if err != nil {
			return 0, fmt.Errorf("list neighbours: %w", err)
		}
		n := 0
		for _, e := range list {
			if e.State&netlink.NUD_PERMANENT != 0 {
				n++
			}
		}
		return n, nil
	}
}

// waitCount polls every 20 ms until exactly want entries exist and returns
// the time it saw them.
func (c *neighCounter) waitCount(want int, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		n, err := c.count()
		now := time.Now()
		if err != nil {
			return now, err
		}
		if n == want {
			return now, nil
		}
		if now.After(deadline) {
			return now, fmt.Errorf("%d neighbour entries after %s, want %d", n, timeout, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
