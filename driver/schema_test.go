package driver

import (
	"net/netip"
	"testing"
)

// TestStoreLayout pins the keys the driver writes: stores written by
// running plugins, and by earlier versions, hold them, so a change here is
// a change of the store's format.
func TestStoreLayout(t *testing.T) {
	const host = "192.0.2.1"
	for _, k := range []struct{ got, want string }{
		{overlayKey("blue"), "overlays/blue"},
		{vniKey(4242), "vnis/4242"},
		{netmapKey(host, "n1"), "netmap/192.0.2.1/n1"},
		{endpointKey("blue", "e1"), "endpoints/blue/e1"},
		{macKey("blue", "02:42:00:00:00:01"), "macs/blue/02:42:00:00:00:01"},
		{addrKey("blue", netip.MustParseAddr("10.20.0.2")), "addrs/blue/10.20.0.2"},
		{hostKey(host), "hosts/192.0.2.1"},
		{seenKey(host), "seen/192.0.2.1"},
		{orphanKey(host, "e1"), "orphans/192.0.2.1/e1"},
		{mcastKey("blue", host), "mcast/blue/192.0.2.1"},
		{netmapOf(host), "netmap/192.0.2.1"},
		{orphansOf(host), "orphans/192.0.2.1"},
		{endpointsOf("blue"), "endpoints/blue"},
		{overlayOfKey("endpoints/blue/e1"), "blue"},
		{hostOfKey(hostsDir, "hosts/192.0.2.1"), host},
		{hostOfKey(netmapDir, "netmap/192.0.2.1/n1"), host},
		{idOfKey("orphans/192.0.2.1/e1"), "e1"},
	} {
		if k.got != k.want {
			t.Errorf("got %q, want %q", k.got, k.want)
		}
	}
	if ov, h, ok := splitMcastKey("mcast/blue/192.0.2.1"); !ok || ov != "blue" || h != host {
		t.Errorf("splitMcastKey = %q %q %v, want blue %s true", ov, h, ok, host)
	}
}
