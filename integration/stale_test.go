package integration

import (
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/ipam"
)

// staleAfter is the grace period the plugins get in TestStaleRecords: long
// enough for h3's partition to heal within it, short enough to wait for.
const staleAfter = 25 * time.Second

// TestStaleRecords, on three hosts sharing etcd, at once:
//   - h2 dies for good. Its endpoints are orphaned within the liveness TTL;
//     status shows them and when h2 is due to be purged; after the grace
//     period every record of h2 is gone: its networks, its membership of
//     overlay blue, overlay red (only h2's) with its VNI, its orphans, its
//     addresses and pool references, its last-seen record.
//   - h3 is cut off from the store for longer than the TTL: its container
//     c3 is orphaned and its address released, and a container on h1 takes
//     that address. When the partition heals, h3 does not take the address
//     back: c3 is cut off from the overlay (its interface loses carrier),
//     the plugin logs an error naming both holders, status marks it; the
//     documented fix (re-create the container) gives it a new address.
func TestStaleRecords(t *testing.T) {
	c := harness.New(t, 3, harness.Options{})
	srv, url, st := kvServerProc(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	startPlugin(t, c, h1, url, "--stale-after", staleAfter.String())
	p2 := startPlugin(t, c, h2, url, "--stale-after", staleAfter.String())
	p3 := startPlugin(t, c, h3, url, "--stale-after", staleAfter.String())
	for _, h := range c.Hosts {
		relNetCreate(t, h)
	}
	h2.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
		"--subnet", "10.71.0.0/24", "-o", "overlay=red", "red")
	a1 := runContainer(t, h1, "a1", "blue")
	runContainer(t, h2, "b2", "blue")
	runContainer(t, h2, "r2", "red")
	ip3 := runContainer(t, h3, "c3", "blue")
	pingEventually(t, h1, "a1", ip3)
	redVNI := overlayVNI(t, st, "red")

	// h2 dies (everything of it, for good); h3 loses the store.
	relCrashHost(t, h2, p2)
	healed := false
	relPartition(t, h3, srv.Addr, true)
	t.Cleanup(func() {
		if !healed {
			relPartition(t, h3, srv.Addr, false)
		}
	})
	gone := time.Now()
	waitFor(t, hostLossBound, "h2's and h3's endpoints are orphaned", func() bool {
		return len(relKeys(t, st, driver.HostOrphans(h2.UnderlayIP))) == 2 && len(relKeys(t, st, driver.HostOrphans(h3.UnderlayIP))) == 1
	})
	cs := statusJSON(t, url)
	if len(cs.Orphans) != 3 {
		t.Errorf("status lists %d orphaned endpoints, want 3 (b2, r2, c3): %+v", len(cs.Orphans), cs.Orphans)
	}
	for _, hi := range cs.Hosts {
		if hi.Address == h2.UnderlayIP && (hi.Alive || hi.Orphans != 2 || hi.PurgeAt.IsZero() || hi.Stale) {
			t.Errorf("status of the dead h2: %+v; want not alive, 2 orphans, a purge time to come", hi)
		}
	}
	table, _ := cli(t, exec.Command(harness.PluginBinary(t), "status", "--store", url, "--stale-after", staleAfter.String()))
	if !strings.Contains(table, "ORPHANED ENDPOINTS") || !strings.Contains(table, "waiting for its host") {
		t.Errorf("status table does not show the orphans:\n%s", table)
	}
	t.Logf("status while h2 is dead and h3 cut off:\n%s", table)

	// h1 takes c3's released address.
	x1 := "x1"
	h1.MustDocker(t, "run", "-d", "--init", "--name", x1, "--network", "blue", "--ip", ip3, harness.Image, "sleep", "3600")
	pingEventually(t, h1, x1, a1)

	relPartition(t, h3, srv.Addr, false)
	healed = true
	if d := time.Since(gone); d > staleAfter-5*time.Second {
		t.Fatalf("the partition healed %s after the cut, too close to the grace period (%s) for the test to mean anything", d, staleAfter)
	}
	waitFor(t, relConverge, "h3 gives up c3's address: its interface loses carrier", func() bool {
		out, _ := h3.Docker("exec", "c3", "ip", "link", "show", "eth0")
		return strings.Contains(out, "NO-CARRIER")
	})
	if ok, _ := ping(h3, "c3", a1); ok {
		t.Errorf("c3, cut off, still reaches a1")
	}
	// A container that has not cached the old MAC (a1 has, for up to a
	// minute: nobody announces an address that moved) finds x1 there.
	runContainer(t, h1, "y1", "blue")
	pingEventually(t, h1, "y1", ip3)
	if arp := h1.MustDocker(t, "exec", "y1", "cat", "/proc/net/arp"); !strings.Contains(arp, relMAC(t, h1, x1)) {
		t.Errorf("%s resolves to another MAC than x1's:\n%s", ip3, arp)
	}
	log, _ := os.ReadFile(p3.Log)
	if !strings.Contains(string(log), "level=ERROR") || !strings.Contains(string(log), "address conflict") || !strings.Contains(string(log), ip3) {
		t.Errorf("h3's plugin logged no error about the conflict on %s:\n%s", ip3, tail(string(log), 3000))
	}
	cs = statusJSON(t, url)
	conflict := false
	for _, o := range cs.Orphans {
		if o.Host == h3.UnderlayIP && o.Conflict != "" && strings.Contains(o.Conflict, ip3) && !o.ConflictSince.IsZero() {
			conflict = true
		}
	}
	if !conflict {
		t.Errorf("status does not mark c3's endpoint as cut off: %+v", cs.Orphans)
	}

	// h2 is purged once the grace period is over.
	waitFor(t, staleAfter+20*time.Second, "every record of h2 purged", func() bool {
		for _, dir := range []string{driver.HostNetworks(h2.UnderlayIP), driver.HostOrphans(h2.UnderlayIP)} {
			if len(relKeys(t, st, dir)) > 0 {
				return false
			}
		}
		_, err := st.Get(t.Context(), driver.SeenKey(h2.UnderlayIP))
		return err != nil
	})
	t.Logf("h2 purged %s after it died (grace period %s)", time.Since(gone).Round(time.Second), staleAfter)
	if _, err := st.Get(t.Context(), driver.OverlayKey("red")); err == nil {
		t.Errorf("overlay red, used only by the purged h2, is still there")
	}
	if _, err := st.Get(t.Context(), driver.VNIKey(redVNI)); err == nil {
		t.Errorf("VNI %d of overlay red is still held", redVNI)
	}
	kv, err := st.Get(t.Context(), driver.OverlayKey("blue"))
	if err != nil || strings.Contains(string(kv.Value), `"`+h2.UnderlayIP+`"`) {
		t.Errorf("overlay blue after the purge: %s, %v; want it without h2", kv.Value, err)
	}
	for _, k := range relKeys(t, st, ipam.Dir) {
		kv, err := st.Get(t.Context(), k)
		if err == nil && strings.Contains(string(kv.Value), `"`+h2.UnderlayIP+`"`) {
			t.Errorf("IPAM record %s still names the purged h2: %s", k, kv.Value)
		}
	}
	cs = statusJSON(t, url)
	for _, hi := range cs.Hosts {
		if hi.Address == h2.UnderlayIP {
			t.Errorf("status still lists the purged h2: %+v", hi)
		}
	}

	// The user's fix for c3: re-create it; it gets a new address.
	h3.MustDocker(t, "rm", "-f", "c3")
	ip3b := runContainer(t, h3, "c3", "blue")
	if ip3b == ip3 {
		t.Fatalf("the re-created c3 got %s again, which x1 holds", ip3b)
	}
	pingEventually(t, h1, "a1", ip3b)
	pingEventually(t, h3, "c3", ip3) // x1
	waitFor(t, relConverge, "no orphans left", func() bool { return len(relKeys(t, st, driver.OrphansDir)) == 0 })
}

// statusJSON runs `status --json` and decodes it.
func statusJSON(t *testing.T, url string) driver.ClusterState {
	t.Helper()
	out, code := cli(t, exec.Command(harness.PluginBinary(t), "status", "--store", url, "--json", "--stale-after", staleAfter.String()))
	var cs driver.ClusterState
	if err := json.Unmarshal([]byte(out), &cs); err != nil || code != 0 {
		t.Fatalf("status --json exited %d: %v\n%s", code, err, out)
	}
	return cs
}
