package ipam

import (
	"math"
	"net/netip"
	"testing"
)

func TestAddressArithmetic(t *testing.T) {
	a := netip.MustParseAddr
	pfx := netip.MustParsePrefix
	for _, c := range []struct{ p, last string }{
		{"10.20.0.0/24", "10.20.0.255"},
		{"10.20.0.128/25", "10.20.0.255"},
		{"0.0.0.0/0", "255.255.255.255"},
		{"fd00::/64", "fd00::ffff:ffff:ffff:ffff"},
		{"::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"},
	} {
		if got := lastAddr(pfx(c.p)); got != a(c.last) {
			t.Errorf("lastAddr(%s) = %s, want %s", c.p, got, c.last)
		}
	}
	if n := span(a("10.0.0.1"), a("10.0.3.254")); n != 1022 {
		t.Errorf("span of a /22's usable addresses = %d", n)
	}
	if n := span(a("fd00::1"), a("fd00::ffff:ffff:ffff:ffff")); n != math.MaxUint64 {
		t.Errorf("span of a /64 = %d, want saturated", n)
	}
	if n := span(a("fd00::"), a("fd01::")); n != math.MaxUint64 {
		t.Errorf("span beyond 64 bits = %d, want saturated", n)
	}
	first, last := a("10.0.0.1"), a("10.0.0.254")
	for _, c := range []struct {
		from string
		n    uint64
		want string
	}{
		{"10.0.0.1", 1, "10.0.0.2"},
		{"10.0.0.250", 4, "10.0.0.254"},
		{"10.0.0.250", 5, "10.0.0.1"},       // past last: wrap to first
		{"255.255.255.250", 10, "10.0.0.1"}, // past the IPv4 space
	} {
		if got := forward(a(c.from), c.n, first, last); got != a(c.want) {
			t.Errorf("forward(%s, %d) = %s, want %s", c.from, c.n, got, c.want)
		}
	}
	if got := forward(a("fd00::ffff:ffff:ffff:fff0"), 0x20, a("fd00::1"), a("fd00:0:0:2::")); got != a("fd00:0:0:1::10") {
		t.Errorf("IPv6 forward with carry = %s", got)
	}
	if got := forward(a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fff0"), 0x20, a("fd00::1"), a("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")); got != a("fd00::1") {
		t.Errorf("IPv6 forward past the end of the space = %s", got)
	}
	if got := after(a("10.0.0.254"), first, last); got != first {
		t.Errorf("after(last) = %s", got)
	}
}

func TestPoolIDs(t *testing.T) {
	pfx := netip.MustParsePrefix
	for _, c := range []struct {
		subnet, rng, id, first, last string
	}{
		{"10.20.0.0/24", "", "dnp-local/10.20.0.0_24", "10.20.0.1", "10.20.0.254"},
		{"10.20.0.0/24", "10.20.0.128/25", "dnp-local/10.20.0.0_24/10.20.0.128_25", "10.20.0.128", "10.20.0.254"},
		{"10.20.0.0/24", "10.20.0.0/25", "dnp-local/10.20.0.0_24/10.20.0.0_25", "10.20.0.1", "10.20.0.127"},
		{"fd00::/64", "", "dnp-local/fd00::_64", "fd00::1", "fd00::ffff:ffff:ffff:ffff"},
	} {
		rng := pfx(c.subnet)
		if c.rng != "" {
			rng = pfx(c.rng)
		}
		p := makePool(LocalSpace, pfx(c.subnet), rng)
		if p.ID != c.id {
			t.Errorf("pool id %q, want %q", p.ID, c.id)
		}
		back, err := parsePoolID(p.ID)
		if err != nil || back != p {
			t.Errorf("parsePoolID(%q) = %+v, %v", p.ID, back, err)
		}
		first, last, ok := p.bounds()
		if !ok || first.String() != c.first || last.String() != c.last {
			t.Errorf("bounds of %s: %s-%s %v, want %s-%s", p.ID, first, last, ok, c.first, c.last)
		}
	}
	for _, bad := range []string{"", "dnp-local", "other/10.0.0.0_24", "dnp-local/10.0.0.0/24", "dnp-local/10.0.0.1_24",
		"dnp-local/10.0.0.0_24/10.1.0.0_25", "dnp-local/10.0.0.0_24/10.0.0.0_24", "dnp-local/10.0.0.0_24/x/y"} {
		if _, err := parsePoolID(bad); err == nil {
			t.Errorf("parsePoolID(%q) accepted", bad)
		}
	}
}
