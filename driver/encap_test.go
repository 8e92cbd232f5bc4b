package driver

import (
	"context"
	"strings"
	"testing"
)

// TestEncapMismatchIsRefused: on a kernel that can build both
// encapsulations, a host asking for an existing overlay with the other one
// is refused by the overlay's own check (compatible), naming both.
func TestEncapMismatchIsRefused(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	a.plane.noGRE, b.plane.noGRE = false, false
	if err := a.d.CreateNetwork(ctx, createReq("n1", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
		t.Fatal(err)
	}
	err := b.d.CreateNetwork(ctx, createReq("n2", "10.20.0.0/24", map[string]string{"overlay": "blue", "encap": "gre"}))
	if err == nil || !strings.Contains(err.Error(), "already exists with encap vxlan, not gre") {
		t.Fatalf("gre on an overlay that exists with vxlan: %v; want it refused", err)
	}
	if err := b.d.CreateNetwork(ctx, createReq("n3", "10.30.0.0/24", map[string]string{"overlay": "green", "encap": "gre"})); err != nil {
		t.Fatal(err)
	}
	err = a.d.CreateNetwork(ctx, createReq("n4", "10.30.0.0/24", map[string]string{"overlay": "green"}))
	if err == nil || !strings.Contains(err.Error(), "already exists with encap gre, not vxlan") {
		t.Fatalf("vxlan on an overlay that exists with gre: %v; want it refused", err)
	}
	if _, err := s.Get(ctx, netmapKey("192.0.2.2", "n2")); err == nil {
		t.Error("the refused network was recorded")
	}
	kv, _ := s.Get(ctx, overlayKey("blue"))
	if rec, _ := decodeKV[overlayRecord](kv); len(rec.Hosts) != 1 || rec.Encap != "vxlan" {
		t.Errorf("overlay blue after the refusal: %+v", rec)
	}
}
