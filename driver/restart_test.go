package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// countingMetrics counts reconciliations.
type countingMetrics struct{ runs atomic.Int64 }

func (m *countingMetrics) Reconciled(int, error) { m.runs.Add(1) }
func (m *countingMetrics) Known(int, int, int)   {}
func (m *countingMetrics) Skipped(int, int)      {} // for Metrics versions that report skipped records

// gatedRegister holds Register back until gate is closed: the host's live
// key comes back late, as it may after a restart.
type gatedRegister struct {
	store.Store
	gate chan struct{}
}

func (g gatedRegister) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	select {
	case <-g.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.Store.Register(ctx, key, value, ttl)
}

// plainRegister registers a key with a plain Put and releases it with a
// Delete: a key left unreleased just stays (as a live key would until its
// TTL), with nothing running for it.
type plainRegister struct{ store.Store }

type plainRegistration struct {
	s   store.Store
	key string
}

func (p plainRegister) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	if _, err := p.Put(ctx, key, value); err != nil {
		return nil, err
	}
	return plainRegistration{p.Store, key}, nil
}

func (r plainRegistration) Release(ctx context.Context) error { return r.s.Delete(ctx, r.key) }

// startDriver runs a driver with cfg's store, plane and address, a short
// liveness TTL and no log, until the test ends or stop is called.
func startDriver(t *testing.T, cfg Config) (d *Driver, stop func()) {
	t.Helper()
	cfg.LiveTTL = 100 * time.Millisecond
	cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx, cancel := context.WithCancel(context.Background())
	d = New(cfg)
	d.Start(ctx)
	stop = func() { cancel(); <-d.Done() }
	t.Cleanup(stop)
	return d, stop
}

// TestOrphanedHostComesBack: a host away for longer than the liveness TTL
// (another host orphaned its endpoint) comes back with its kernel intact.
// Its first reconciliations run before its live key is back, and before
// it looked at its orphans: they must not remove the overlay whose
// interfaces the restore then finds. Nor may the one right after the
// restore, before the watch brings the restored record.
func TestOrphanedHostComesBack(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	const lost = "192.0.2.3"
	a := startHost(t, s, "192.0.2.1", newFakePlane())
	c := startHost(t, s, lost, newFakePlane())
	opts := map[string]string{"overlay": "blue"}
	for _, h := range []*testHost{a, c} {
		if err := h.d.CreateNetwork(ctx, createReq("net"+h.d.host, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	joinEP(t, a, "net192.0.2.1", "epa1aaaa", "10.20.0.2/24")
	joinEP(t, c, "net"+lost, "epc1cccc", "10.20.0.3/24")
	n, _ := a.d.network(ctx, "net192.0.2.1")
	vni := n.Overlay.VNI
	eventually(t, "host a programs c's endpoint", func() bool { return len(a.plane.peerIPs(vni)) == 1 })

	c.stop()
	eventually(t, "c's endpoint becomes an orphan", func() bool { return len(keys(t, s, orphansOf(lost))) == 1 })

	gate := make(chan struct{})
	var open sync.Once
	m := &countingMetrics{}
	startDriver(t, Config{Store: gatedRegister{Store: s, gate: gate}, Plane: c.plane, HostAddr: netip.MustParseAddr(lost), Metrics: m})
	t.Cleanup(func() { open.Do(func() { close(gate) }) }) // before the driver stops: it waits for Register
	eventually(t, "c reconciled without its live key", func() bool { return m.runs.Load() > 0 })
	if !slices.Contains(c.plane.vnis(), vni) {
		t.Fatalf("c's overlay was removed before its orphaned endpoint was looked at: overlays %v", c.plane.vnis())
	}
	open.Do(func() { close(gate) })
	eventually(t, "c restores its endpoint and host a programs it again", func() bool {
		return len(keys(t, s, orphansDir)) == 0 && slices.Equal(a.plane.peerIPs(vni), []string{"10.20.0.3@" + lost})
	})
	if ok, _ := c.plane.HasEndpoint(vni, "epc1cccc"); !ok {
		t.Fatal("c's endpoint interface is gone")
	}
}

// TestKeepLiveOnStop: with KeepLiveOnStop a driver that stops while this
// host has endpoints leaves its live key to lapse and says so; with no
// endpoint left it releases the key.
func TestKeepLiveOnStop(t *testing.T) {
	ctx := context.Background()
	s := plainRegister{openStore(t)}
	const addr = "192.0.2.1"
	start := func() (*testHost, func()) {
		p := newFakePlane()
		d, stop := startDriver(t, Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), KeepLiveOnStop: true})
		h := &testHost{d: d, plane: p}
		eventually(t, "host registered", func() bool { _, err := s.Get(ctx, hostKey(addr)); return err == nil })
		return h, stop
	}
	h, stop := start()
	if err := h.d.CreateNetwork(ctx, createReq("net1", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
		t.Fatal(err)
	}
	joinEP(t, h, "net1", "ep1aaaaa", "10.20.0.2/24")
	stop()
	if !h.d.KeptLive() {
		t.Fatal("stopped with an endpoint: KeptLive false")
	}
	if _, err := s.Get(ctx, hostKey(addr)); err != nil {
		t.Fatalf("stopped with an endpoint: live key gone: %v", err)
	}

	h, stop = start()
	leaveEP(t, h, "net1", "ep1aaaaa")
	stop()
	if h.d.KeptLive() {
		t.Fatal("stopped with no endpoint: KeptLive true")
	}
	if _, err := s.Get(ctx, hostKey(addr)); err == nil {
		t.Fatal("stopped with no endpoint: live key still there")
	}
}
