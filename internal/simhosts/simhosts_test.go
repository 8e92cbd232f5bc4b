package simhosts

import (
	"net/netip"
	"testing"
)

func TestEndpoint(t *testing.T) {
	f := &Fleet{Overlay: "blue", Subnet: netip.MustParsePrefix("10.64.0.0/14"), Offset: 4096,
		Hosts: []netip.Addr{netip.MustParseAddr("192.168.1.100"), netip.MustParseAddr("192.168.1.101")}}
	for _, c := range []struct {
		i        int
		ip, host string
		key, mac string
	}{
		{0, "10.64.16.0", "192.168.1.100", "endpoints/blue/sim-0000000", "02:be:00:00:00:00"},
		{1, "10.64.16.1", "192.168.1.101", "endpoints/blue/sim-0000001", "02:be:00:00:00:01"},
		{100_000, "10.65.150.160", "192.168.1.100", "endpoints/blue/sim-0100000", "02:be:00:01:86:a0"},
	} {
		e := f.Endpoint(c.i)
		if e.IP.String() != c.ip || e.Host.String() != c.host || e.Key != c.key || e.MAC.String() != c.mac {
			t.Errorf("Endpoint(%d) = %s on %s, key %s, MAC %s; want %s on %s, key %s, MAC %s",
				c.i, e.IP, e.Host, e.Key, e.MAC, c.ip, c.host, c.key, c.mac)
		}
		if !IsSimulated(e.Key) || IsSimulated("endpoints/blue/0123abcd") {
			t.Errorf("IsSimulated wrong for %s", e.Key)
		}
	}
	// The subnet's last address is its broadcast address: no endpoint's.
	defer func() {
		if recover() == nil {
			t.Error("Endpoint past the subnet's end did not panic")
		}
	}()
	f.Endpoint(1<<18 - 4096 - 1)
}

func TestRemote(t *testing.T) {
	records := map[netip.Addr]string{
		netip.MustParseAddr("10.0.0.2"): "192.168.1.11",
		netip.MustParseAddr("10.0.0.3"): "192.168.1.12",
		netip.MustParseAddr("10.0.0.4"): "192.168.1.100",
	}
	got := Remote(records, netip.MustParseAddr("192.168.1.11"))
	if len(got) != 2 || got[netip.MustParseAddr("10.0.0.2")] || !got[netip.MustParseAddr("10.0.0.3")] || !got[netip.MustParseAddr("10.0.0.4")] {
		t.Errorf("Remote = %v, want 10.0.0.3 and 10.0.0.4", got)
	}
}
