package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// hostLossBound is how long after a host is lost the others must have
// dropped its entries and released its addresses: the liveness TTL (10 s,
// startPlugin's --live-ttl) plus a few seconds.
const hostLossBound = 16 * time.Second

// TestHostLoss: a host cut from the store, then a host killed whole. Within
// the liveness TTL the others stop reaching its containers and its
// addresses return to the pool; when it comes back its surviving
// containers are reachable again.
func TestHostLoss(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	srv, url, st := kvServerProc(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	h1, h3 := c.Hosts[0], c.Hosts[2]
	startPlugin(t, c, h1, url)
	startPlugin(t, c, c.Hosts[1], url)
	p3 := startPlugin(t, c, h3, url)
	for _, h := range c.Hosts {
		relNetCreate(t, h)
	}
	runContainer(t, h1, "a1", "blue")
	ip3 := runContainer(t, h3, "c3", "blue", "--restart", "always")
	pingEventually(t, h1, "a1", ip3)
	if !hlAllocated(t, st, ip3) {
		t.Fatalf("%s of c3 is not allocated in the store", ip3)
	}

	gone := func(what string, start time.Time, ip string) {
		t.Helper()
		waitFor(t, hostLossBound, what+": h1 stops reaching c3 and its address "+ip+" is released", func() bool {
			ok, _ := ping(h1, "a1", ip)
			return !ok && !hlAllocated(t, st, ip)
		})
		t.Logf("%s: c3 unreachable from h1 and %s released %s after the loss", what, ip, time.Since(start).Round(100*time.Millisecond))
	}

	// (a) Partition: h3 loses the store; its plugin and containers run on.
	healed := false
	relPartition(t, h3, srv.Addr, true)
	t.Cleanup(func() {
		if !healed {
			relPartition(t, h3, srv.Addr, false)
		}
	})
	cut := time.Now()
	gone("partition", cut, ip3)
	if d := time.Since(cut); d < 8*time.Second {
		t.Errorf("h3 was forgotten %s after the cut, before its liveness TTL (10 s)", d)
	}
	relPartition(t, h3, srv.Addr, false)
	healed = true
	heal := time.Now()
	waitFor(t, relConverge, "h3 takes its address back", func() bool { return hlAllocated(t, st, ip3) })
	pingEventually(t, h1, "a1", ip3)
	t.Logf("partition healed: c3 reachable from h1 again %s later", time.Since(heal).Round(100*time.Millisecond))
	hlNoOrphans(t, st)

	// (b) The whole host dies: plugin, dockerd, containerd, containers.
	relCrashHost(t, h3, p3)
	crash := time.Now()
	gone("host killed", crash, ip3)
	p3.Start(t)
	if err := h3.StartDockerd(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	waitFor(t, relConverge, "c3 running again on h3", func() bool {
		out, _ := h3.Docker("inspect", "-f", "{{.State.Running}}", "c3")
		return out == "true"
	})
	ip3 = relIP(t, h3, "c3")
	pingEventually(t, h1, "a1", ip3)
	t.Logf("host back: c3 (%s) reachable from h1 %s after the restart", ip3, time.Since(back).Round(100*time.Millisecond))
	if !hlAllocated(t, st, ip3) {
		t.Errorf("%s of the restarted c3 is not allocated in the store", ip3)
	}
	hlNoOrphans(t, st)
}

// hlAllocated says whether ip is allocated in the store's IPAM.
func hlAllocated(t *testing.T, st store.Store, ip string) bool {
	for _, k := range relKeys(t, st, ipam.AddrsDir) {
		if strings.HasSuffix(k, "/"+ip) {
			return true
		}
	}
	return false
}

// hlNoOrphans waits until no orphaned endpoint record is left.
func hlNoOrphans(t *testing.T, st store.Store) {
	t.Helper()
	waitFor(t, relConverge, "no orphaned endpoint records left", func() bool { return len(relKeys(t, st, driver.OrphansDir)) == 0 })
}
