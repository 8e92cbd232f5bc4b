package driver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	dipam "github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// TestStaleHostIsPurged: a host gone longer than the grace period loses
// every record: its networks, its membership of overlays (an overlay only
// it used goes, with its VNI), its orphaned endpoints, its addresses and
// pool references, its last-seen record. What the live host holds stays.
func TestStaleHostIsPurged(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	const gone = "192.0.2.3"
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	start := func(addr string) *testHost {
		ctx, cancel := context.WithCancel(context.Background())
		p := newFakePlane()
		d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), LiveTTL: 100 * time.Millisecond,
			StaleAfter: time.Second, Log: quiet})
		d.Start(ctx)
		stop := func() { cancel(); <-d.Done() }
		t.Cleanup(stop)
		return &testHost{d: d, plane: p, stop: stop}
	}
	a, c := start("192.0.2.1"), start(gone)
	ipc := ipam.New(s, ipam.Options{HostID: gone, Logger: quiet})
	ipa := ipam.New(s, ipam.Options{HostID: "192.0.2.1", Logger: quiet})
	for _, r := range []struct {
		d      *ipam.Driver
		subnet string
	}{{ipa, "10.20.0.0/24"}, {ipc, "10.20.0.0/24"}, {ipc, "10.30.0.0/24"}} {
		p, err := r.d.RequestPool(ctx, &dipam.RequestPoolRequest{AddressSpace: ipam.LocalSpace, Pool: r.subnet})
		if err != nil {
			t.Fatal(err)
		}
		if r.subnet == "10.20.0.0/24" && r.d == ipc {
			if _, err := ipc.RequestAddress(ctx, &dipam.RequestAddressRequest{PoolID: p.PoolID, Address: "10.20.0.3"}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, n := range []struct {
		h           *testHost
		id, subnet  string
		overlayName string
	}{{a, "netA", "10.20.0.0/24", "blue"}, {c, "netC", "10.20.0.0/24", "blue"}, {c, "netCred", "10.30.0.0/24", "red"}} {
		if err := n.h.d.CreateNetwork(ctx, createReq(n.id, n.subnet, map[string]string{"overlay": n.overlayName})); err != nil {
			t.Fatal(err)
		}
	}
	joinEP(t, c, "netC", "epc1cccc", "10.20.0.3/24")
	red, _ := c.d.network(ctx, "netCred")
	// Multicast groups joined on overlay blue, as each host's plugin records them.
	for _, h := range []string{gone, "192.0.2.1"} {
		if _, err := s.Put(ctx, mcastKey("blue", h), []byte(`{"groups":["239.1.1.1"]}`)); err != nil {
			t.Fatal(err)
		}
	}

	// c dies and never comes back (its live key expires; a clean stop
	// would remove it at once).
	c.stop()
	s.Delete(ctx, hostKey(gone))
	eventually := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("not true within 10s: %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	eventually("c's endpoint is orphaned", func() bool { return len(keys(t, s, orphansOf(gone))) == 1 })
	eventually("c's records are purged after the grace period", func() bool {
		_, err := s.Get(ctx, seenKey(gone)) // the purge's last step
		return len(keys(t, s, netmapOf(gone))) == 0 && len(keys(t, s, orphansDir)) == 0 && errors.Is(err, store.ErrNotFound)
	})
	eventually("overlay red, only c's, is gone with its VNI", func() bool {
		_, err := s.Get(ctx, overlayKey("red"))
		_, verr := s.Get(ctx, vniKey(red.Overlay.VNI))
		return err != nil && verr != nil
	})
	kv, err := s.Get(ctx, overlayKey("blue"))
	if err != nil {
		t.Fatalf("overlay blue, which a still uses: %v", err)
	}
	blue, _ := decodeKV[overlayRecord](kv)
	if !slices.Equal(blue.Hosts, []string{"192.0.2.1"}) {
		t.Errorf("overlay blue's hosts after the purge: %v", blue.Hosts)
	}
	for _, kv := range mustList(t, s, ipam.Dir) {
		if strings.Contains(string(kv.Value), `"`+gone+`"`) {
			t.Errorf("IPAM record still names the purged host: %s = %s", kv.Key, kv.Value)
		}
	}
	if _, err := s.Get(ctx, netmapKey("192.0.2.1", "netA")); err != nil {
		t.Errorf("the live host's network went with the purge: %v", err)
	}
	if got := keys(t, s, mcastDir); !slices.Equal(got, []string{mcastKey("blue", "192.0.2.1")}) {
		t.Errorf("multicast records after the purge: %v; want only the live host's", got)
	}
}

func mustList(t *testing.T, s store.Store, dir string) []store.KV {
	t.Helper()
	kvs, err := s.List(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return kvs
}
