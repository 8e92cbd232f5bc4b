package driver

import (
	"net/netip"
	"time"

	"github.com/docker/go-plugins-helpers/network"
)

// NameService makes container names resolvable across hosts (package
// names). The driver tells it which endpoints join and what the store
// holds; it never blocks and never calls dockerd. Config.Names nil means
// no name service.
type NameService interface {
	// Join is called by Join once the overlay and the endpoint's
	// interface exist on this host; it returns the routes the container
	// needs to reach the name server (none when it needs none).
	Join(ov Overlay, endpointID, sandboxKey string) []*network.StaticRoute
	// Leave is called when the endpoint leaves its container (Leave,
	// DeleteEndpoint); it may be called more than once.
	Leave(endpointID string)
	// Observe is given, before every reconciliation of this host's
	// kernel, every endpoint the store holds and the live hosts.
	Observe(endpoints []KnownEndpoint, liveHosts []string)
	// OverlayUp is called once the overlay exists (again) on this host,
	// OverlayDown before it is removed from it.
	OverlayUp(ov Overlay)
	OverlayDown(vni uint32)
}

// ensureOverlay builds the overlay on this host and tells the name service.
func (d *Driver) ensureOverlay(ov Overlay) error {
	if err := d.cfg.Plane.EnsureOverlay(ov); err != nil {
		return err
	}
	if d.cfg.Names != nil {
		d.cfg.Names.OverlayUp(ov)
	}
	return nil
}

// removeOverlay tells the name service, then removes the overlay from this host.
func (d *Driver) removeOverlay(vni uint32) error {
	if d.cfg.Names != nil {
		d.cfg.Names.OverlayDown(vni)
	}
	return d.cfg.Plane.RemoveOverlay(vni)
}

// KnownEndpoint is an endpoint as the store records it.
type KnownEndpoint struct {
	Overlay string
	ID      string
	Network string // Docker network id on its host
	Host    string // underlay address of its host
	IPv4    netip.Addr
	IPv6    netip.Addr // invalid when none
}

// observeNames hands the store's endpoints and live hosts, as the peer
// sync mirrors them, to the name service.
func (p *peerSync) observeNames() {
	ns := p.names
	if ns == nil {
		return
	}
	p.namesSeen = time.Now()
	eps := make([]KnownEndpoint, 0, len(p.endpoints))
	for key, rec := range p.endpoints {
		ke := KnownEndpoint{Overlay: overlayOfKey(key), ID: idOfKey(key), Network: rec.Network, Host: rec.Host}
		if pfx, err := netip.ParsePrefix(rec.IPv4); err == nil {
			ke.IPv4 = pfx.Addr()
		}
		if pfx, err := netip.ParsePrefix(rec.IPv6); err == nil {
			ke.IPv6 = pfx.Addr()
		}
		eps = append(eps, ke)
	}
	hosts := make([]string, 0, len(p.hosts))
	for h := range p.hosts {
		hosts = append(hosts, h)
	}
	ns.Observe(eps, hosts)
}
