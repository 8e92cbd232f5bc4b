package driver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/store"
)

// cryptPlane is a fakePlane that can encrypt: it records the host keys.
type cryptPlane struct {
	*fakePlane
	mu   sync.Mutex
	keys map[netip.Addr]string
	err  error // CheckEncryption's answer
}

func (c *cryptPlane) CheckEncryption() error  { return c.err }
func (c *cryptPlane) ResumeEncryption() error { return nil }
func (c *cryptPlane) SetHostKeys(keys map[netip.Addr]string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	maps.Copy(c.keys, keys)
	return nil
}
func (c *cryptPlane) known() map[netip.Addr]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.keys)
}

func newCryptHost(t *testing.T, s store.Store, addr, pub string) (*Driver, *cryptPlane) {
	ctx, cancel := context.WithCancel(context.Background())
	p := &cryptPlane{fakePlane: newFakePlane(), keys: map[netip.Addr]string{}}
	d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), PublicKey: pub, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	return d, p
}

func TestEncryptedOption(t *testing.T) {
	for _, c := range []struct {
		v    string
		want bool
		err  string
	}{
		{"", true, ""}, {"true", true, ""}, {"1", true, ""}, {"false", false, ""}, {"yes please", false, "want no value, true or false"},
	} {
		spec, err := parseSpec(map[string]string{OptEncrypted: c.v}, []*network.IPAMData{{Pool: "10.1.0.0/24"}})
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("encrypted=%q: %v, want %q", c.v, err, c.err)
			}
			continue
		}
		if err != nil || spec.Encrypted != c.want {
			t.Errorf("encrypted=%q: %v, %v; want %v", c.v, spec.Encrypted, err, c.want)
		}
	}
	_, err := parseSpec(map[string]string{OptEncrypted: "", OptEncap: "gre"}, []*network.IPAMData{{Pool: "10.1.0.0/24"}})
	if err == nil || !strings.Contains(err.Error(), "encap vxlan only") {
		t.Errorf("encrypted gre: %v", err)
	}
}

// The same overlay with and without encryption on two hosts is refused;
// the encrypted one reaches the data plane as encrypted; a host that
// cannot encrypt says so; every host learns the others' public keys.
func TestEncryptedOverlay(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, pa := newCryptHost(t, s, "192.0.2.1", "KEY-A")
	b, pb := newCryptHost(t, s, "192.0.2.2", "KEY-B")

	enc := map[string]string{"overlay": "secret", OptEncrypted: ""}
	if err := a.CreateNetwork(ctx, createReq("na", "10.20.0.0/24", enc)); err != nil {
		t.Fatal(err)
	}
	err := b.CreateNetwork(ctx, createReq("nb", "10.20.0.0/24", map[string]string{"overlay": "secret"}))
	if err == nil || !strings.Contains(err.Error(), "already exists encrypted") {
		t.Fatalf("plain network on an encrypted overlay: %v", err)
	}
	if err := a.CreateNetwork(ctx, createReq("na2", "10.30.0.0/24", map[string]string{"overlay": "open"})); err != nil {
		t.Fatal(err)
	}
	err = b.CreateNetwork(ctx, createReq("nb2", "10.30.0.0/24", map[string]string{"overlay": "open", OptEncrypted: "true"}))
	if err == nil || !strings.Contains(err.Error(), "already exists unencrypted") {
		t.Fatalf("encrypted network on a plain overlay: %v", err)
	}
	if err := b.CreateNetwork(ctx, createReq("nb", "10.20.0.0/24", enc)); err != nil {
		t.Fatal(err)
	}

	joinEP(t, &testHost{d: a}, "na", "epa1aaaa", "10.20.0.2/24")
	n, _ := a.network(ctx, "na")
	pa.fakePlane.mu.Lock()
	ov := pa.overlays[n.Overlay.VNI]
	pa.fakePlane.mu.Unlock()
	if !ov.Encrypted {
		t.Fatalf("overlay reached the data plane as %+v, want encrypted", ov)
	}

	eventually(t, "each host knows the other's key (and not its own)", func() bool {
		ka, kb := pa.known(), pb.known()
		return len(ka) == 1 && ka[netip.MustParseAddr("192.0.2.2")] == "KEY-B" &&
			len(kb) == 1 && kb[netip.MustParseAddr("192.0.2.1")] == "KEY-A"
	})

	// A host that cannot encrypt refuses -o encrypted with the reason, and
	// one without a key too.
	c, pc := newCryptHost(t, s, "192.0.2.3", "KEY-C")
	pc.err = errors.New("no TUN here")
	if err := c.CreateNetwork(ctx, createReq("nc", "10.20.0.0/24", enc)); err == nil || !strings.Contains(err.Error(), "no TUN here") {
		t.Fatalf("host without encryption: %v", err)
	}
	d, _ := newCryptHost(t, s, "192.0.2.4", "")
	if err := d.CreateNetwork(ctx, createReq("nd", "10.20.0.0/24", enc)); err == nil || !strings.Contains(err.Error(), "cannot encrypt") {
		t.Fatalf("host without a key: %v", err)
	}
	if kvs, _ := s.List(ctx, netmapDir+"/192.0.2.3"); len(kvs) != 0 {
		t.Fatalf("a refused network was recorded: %v", kvs)
	}
}
