package overlay_test

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
)

// scalePeers is hosts x perHost remote endpoints: host i is
// 192.168.<100+i/250>.<i%250+1>, each endpoint one IPv4 address.
func scalePeers(hosts, perHost int) ([]overlay.Peer, []netip.Addr) {
	var peers []overlay.Peer
	var hostIPs []netip.Addr
	for h := range hosts {
		host := netip.AddrFrom4([4]byte{192, 168, byte(100 + h/250), byte(h%250 + 1)})
		hostIPs = append(hostIPs, host)
		for e := range perHost {
			i := h*perHost + e
			peers = append(peers, overlay.Peer{
				HostIP: host,
				MAC:    net.HardwareAddr{0x02, 0x42, byte(i >> 24), byte(i >> 16), byte(i >> 8), byte(i)},
				IPs:    []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})},
			})
		}
	}
	return peers, hostIPs
}

// cost is what f took: wall time, CPU time of the process in user space
// and in the kernel, and the largest Go heap in use seen above the heap
// before f.
type cost struct {
	wall, user, sys time.Duration
	heap            uint64
}

func (c cost) String() string {
	return fmt.Sprintf("%v (cpu user %v, sys %v), heap +%.1f MiB", c.wall.Round(time.Millisecond),
		c.user.Round(time.Millisecond), c.sys.Round(time.Millisecond), float64(c.heap)/(1<<20))
}

func measure(f func()) cost {
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	wall, heap := heapPeak(f)
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	return cost{
		wall: wall, heap: heap,
		user: time.Duration(after.Utime.Nano() - before.Utime.Nano()),
		sys:  time.Duration(after.Stime.Nano() - before.Stime.Nano()),
	}
}

// heapPeak samples the Go heap while f runs; it returns f's duration and
// the largest heap in use seen above the heap before f.
func heapPeak(f func()) (time.Duration, uint64) {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	start := time.Now()
	f()
	d := time.Since(start)
	close(stop)
	wg.Wait()
	if peak.Load() < base {
		return d, 0
	}
	return d, peak.Load() - base
}

// TestScalePeers measures (no assertions on time: it only logs) how long
// SetPeers and UpdatePeers take with many remote endpoints, and how much
// Go heap SetPeers uses. Only with DNP_SCALE=1:
//
//	DNP_SCALE=1 go test -count=1 -v -run TestScalePeers ./overlay/
func TestScalePeers(t *testing.T) {
	if os.Getenv("DNP_SCALE") != "1" {
		t.Skip("measurement: runs only with DNP_SCALE=1")
	}
	hs := newHosts(t, 1)
	a := hs[0]
	for _, size := range []struct{ hosts, perHost int }{{100, 100}, {100, 1000}} {
		t.Run(fmt.Sprint(size.hosts*size.perHost), func(t *testing.T) {
			n, err := a.host.EnsureNetwork(overlay.NetworkConfig{ID: "scale", VNI: 77, LocalIP: a.ip})
			if err != nil {
				t.Fatal(err)
			}
			defer a.host.DeleteNetwork("scale")
			peers, hosts := scalePeers(size.hosts, size.perHost)
			t.Logf("one change with nothing programmed: %s", oneChange(t, n, hosts[0], true))
			var changes int
			c := measure(func() { changes, err = n.SetPeers(peers, hosts) })
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("SetPeers of %d peers on %d hosts from empty: %v, %d changes", len(peers), len(hosts), c, changes)
			c = measure(func() { changes, err = n.SetPeers(peers, hosts) })
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("SetPeers again, nothing to change: %v, %d changes", c, changes)
			t.Logf("one change with %d peers programmed: %s", len(peers), oneChange(t, n, hosts[0], false))
		})
	}
}

// oneChange times UpdatePeers adding one peer on host and removing it
// again, 20 times each; with addHost, the host is added first (and
// removed after). It returns the median and largest times.
func oneChange(t *testing.T, n *overlay.Network, host netip.Addr, addHost bool) string {
	t.Helper()
	if addHost {
		if _, err := n.UpdatePeers(overlay.Delta{AddHosts: []netip.Addr{host}}); err != nil {
			t.Fatal(err)
		}
		defer n.UpdatePeers(overlay.Delta{RemoveHosts: []netip.Addr{host}})
	}
	p := overlay.Peer{HostIP: host, MAC: net.HardwareAddr{0x02, 0x43, 0, 0, 0, 1}, IPs: []netip.Addr{netip.MustParseAddr("10.255.255.1")}}
	var add, del []time.Duration
	for range 20 {
		start := time.Now()
		if _, err := n.UpdatePeers(overlay.Delta{Add: []overlay.Peer{p}}); err != nil {
			t.Fatal(err)
		}
		add = append(add, time.Since(start))
		start = time.Now()
		if _, err := n.UpdatePeers(overlay.Delta{Remove: []overlay.Peer{p}}); err != nil {
			t.Fatal(err)
		}
		del = append(del, time.Since(start))
	}
	slices.Sort(add)
	slices.Sort(del)
	return fmt.Sprintf("add one peer: median %v, max %v; remove it: median %v, max %v",
		add[len(add)/2].Round(time.Microsecond), add[len(add)-1].Round(time.Microsecond),
		del[len(del)/2].Round(time.Microsecond), del[len(del)-1].Round(time.Microsecond))
}
