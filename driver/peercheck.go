package driver

import (
	"fmt"
	"net/netip"
)

// checkPeer says why an endpoint record another host wrote must not be
// programmed into this host's overlay ov, if it must not. Records in the
// store are untrusted input: a hostile or broken one must not hijack
// traffic (a broadcast or multicast MAC, the gateway's address), point
// tunnels at nowhere (an unspecified, multicast or loopback underlay
// address, or this host's own), or make the kernel refuse the whole peer
// set (an address family the tunnels cannot reach).
func checkPeer(rec endpointRecord, peer Peer, ov Overlay, self netip.Addr) error {
	h := peer.Host
	switch {
	case h.String() != rec.Host:
		return fmt.Errorf("host %q is not written canonically (%s)", rec.Host, h)
	case h.IsUnspecified() || h.IsMulticast() || h.IsLoopback() || h.IsLinkLocalUnicast() || h.IsLinkLocalMulticast():
		return fmt.Errorf("host %s is no unicast underlay address", h)
	case h == self:
		return fmt.Errorf("host %s is this host", h)
	case self.IsValid() && h.Is4() != self.Is4():
		return fmt.Errorf("host %s is of another address family than this host's %s", h, self)
	}
	mac := peer.MAC
	switch {
	case len(mac) != 6:
		return fmt.Errorf("mac %s is not 6 bytes", mac)
	case mac[0]&1 != 0:
		return fmt.Errorf("mac %s is a multicast or broadcast address", mac)
	case mac[0]|mac[1]|mac[2]|mac[3]|mac[4]|mac[5] == 0:
		return fmt.Errorf("mac %s is all zeros", mac)
	}
	if rec.IPv4 == "" {
		return fmt.Errorf("no IPv4 address")
	}
	for i, ip := range peer.IPs {
		if i == 0 && !ip.Is4() || i > 0 && !ip.Is6() {
			return fmt.Errorf("address %s is in the wrong field", ip)
		}
		if err := checkPeerIP(ip, ov); err != nil {
			return err
		}
	}
	return nil
}

// checkPeerIP: an endpoint address is inside one of the overlay's subnets,
// and is neither its network, broadcast nor gateway address.
func checkPeerIP(ip netip.Addr, ov Overlay) error {
	if ip.Zone() != "" {
		return fmt.Errorf("address %s has a zone", ip)
	}
	for i, s := range ov.Subnets {
		if !s.Contains(ip) {
			continue
		}
		if ip == s.Masked().Addr() || ip.Is4() && ip == lastAddr(s) {
			return fmt.Errorf("address %s is the network or broadcast address of %s", ip, s)
		}
		if i < len(ov.Gateways) && ov.Gateways[i] == ip {
			return fmt.Errorf("address %s is the gateway of %s", ip, s)
		}
		return nil
	}
	return fmt.Errorf("address %s is in none of the overlay's subnets %v", ip, ov.Subnets)
}

// lastAddr is the last address of an IPv4 prefix (its broadcast address).
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
