package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"
)

// gatedPlane is a fakePlane whose Overlays call (the start of the peer
// sync's removal of unused overlays) can be held, and whose RemoveOverlay
// takes the overlay's endpoints with it, as deleting the namespace does in
// the kernel.
type gatedPlane struct {
	*fakePlane
	armed   atomic.Bool
	entered chan struct{}
	release chan struct{}
}

func (g *gatedPlane) Overlays() ([]uint32, error) {
	if g.armed.CompareAndSwap(true, false) {
		close(g.entered)
		<-g.release
	}
	return g.fakePlane.Overlays()
}

func (g *gatedPlane) RemoveOverlay(vni uint32) error {
	g.mu.Lock()
	for id, v := range g.eps {
		if v == vni {
			delete(g.eps, id)
		}
	}
	g.mu.Unlock()
	return g.fakePlane.RemoveOverlay(vni)
}

func (g *gatedPlane) joined(epID string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	vni, ok := g.eps[epID]
	_, built := g.overlays[vni]
	return ok && built
}

// A container joins an overlay while the peer sync is removing that
// overlay from the host because its previous last local endpoint just went
// (docker rm -f old; docker run new; or dockerd cleaning up after a crash).
// The new endpoint must keep its interface: the removal must not delete
// the overlay under a Join that has already built it.
func TestJoinDuringOverlayRemoval(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	g := &gatedPlane{fakePlane: newFakePlane(), entered: make(chan struct{}), release: make(chan struct{})}
	d := New(Config{Store: s, Plane: g, HostAddr: netip.MustParseAddr("192.0.2.1"), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	runCtx, cancel := context.WithCancel(ctx)
	d.Start(runCtx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	h := &testHost{d: d, plane: g.fakePlane, stop: cancel}

	if err := d.CreateNetwork(ctx, createReq("n1", "10.20.0.0/24", nil)); err != nil {
		t.Fatal(err)
	}
	joinEP(t, h, "n1", "old0aaaa", "10.20.0.2/24")
	eventually(t, "the overlay is built", func() bool { return g.joined("old0aaaa") })

	// The old container goes; the peer sync starts removing the overlay
	// and is held just before it looks at what is present.
	g.armed.Store(true)
	leaveEP(t, h, "n1", "old0aaaa")
	select {
	case <-g.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the peer sync did not start removing the unused overlay")
	}

	// Meanwhile the new container's endpoint is created and joins.
	if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: "n1", EndpointID: "new0bbbb",
		Interface: &network.EndpointInterface{Address: "10.20.0.3/24"}}); err != nil {
		t.Fatal(err)
	}
	joined := make(chan error, 1)
	go func() {
		_, err := d.Join(ctx, &network.JoinRequest{NetworkID: "n1", EndpointID: "new0bbbb", SandboxKey: "/nonexistent"})
		joined <- err
	}()
	time.Sleep(100 * time.Millisecond) // let Join run as far as it can
	close(g.release)
	select {
	case err := <-joined:
		if err != nil {
			t.Fatalf("join: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("join did not return")
	}

	// Let the peer sync settle, then the new endpoint must still be there.
	time.Sleep(200 * time.Millisecond)
	if !g.joined("new0bbbb") {
		t.Fatalf("the endpoint that joined lost its interface: the overlay was removed under it (overlays %v)", g.vnis())
	}
}
