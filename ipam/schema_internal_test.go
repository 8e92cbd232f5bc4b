package ipam

import (
	"net/netip"
	"testing"
)

// TestStoreLayout pins the keys the IPAM driver writes: stores written by
// running plugins, and by earlier versions, hold them, so a change here is
// a change of the store's format.
func TestStoreLayout(t *testing.T) {
	p := makePool(LocalSpace, netip.MustParsePrefix("10.20.0.0/24"), netip.MustParsePrefix("10.20.0.128/25"))
	a := netip.MustParseAddr("10.20.0.130")
	for _, k := range []struct{ got, want string }{
		{spaceKey(LocalSpace), "ipam/spaces/dnp-local"},
		{spaceAddrs(LocalSpace), "ipam/addrs/dnp-local"},
		{p.addrDir(), "ipam/addrs/dnp-local/10.20.0.0_24"},
		{p.addrKey(a), "ipam/addrs/dnp-local/10.20.0.0_24/10.20.0.130"},
		{p.hintKey(), "ipam/hints/dnp-local/10.20.0.0_24/10.20.0.128_25"},
	} {
		if k.got != k.want {
			t.Errorf("got %q, want %q", k.got, k.want)
		}
	}
	if got, err := p.addrOfKey(p.addrKey(a)); err != nil || got != a {
		t.Errorf("addrOfKey = %v, %v; want %s", got, err, a)
	}
}
