package driver

import (
	"net/netip"
	"strconv"
	"strings"
)

// Store layout, below the store's own prefix:
//
//	overlays/<name>               overlayRecord: the cluster-wide overlay, with the hosts and
//	                              Docker networks using it
//	vnis/<vni>                    the overlay name holding that VNI (keeps VNIs unique)
//	netmap/<host>/<network id>    networkRecord: which overlay a host's Docker network is
//	endpoints/<overlay>/<ep id>   endpointRecord: one container interface, on one host
//	macs/<overlay>/<mac>          claimRecord: the endpoint holding that MAC on the overlay
//	addrs/<overlay>/<ip>          claimRecord: the endpoint holding that address on the overlay
//	hosts/<host>                  hostRecord, a live key: gone when the host's plugin dies
//	seen/<host>                   seenRecord: when the host's plugin last proved alive
//	orphans/<host>/<ep id>        orphanRecord: an endpoint of a lost host (hostloss.go)
//	mcast/<overlay>/<host>        groupsRecord: the multicast groups a host's containers
//	                              joined on the overlay (mcast.go)
//
// <host> is the host's underlay (advertise) address. An endpoint record
// and its claims are written and deleted in one transaction (claims.go).
// Package ipam keeps its records below ipam/, package names below names/.
const (
	overlaysDir  = "overlays"
	vnisDir      = "vnis"
	netmapDir    = "netmap"
	endpointsDir = "endpoints"
	macsDir      = "macs"
	addrsDir     = "addrs"
	hostsDir     = "hosts"
	seenDir      = "seen"
	orphansDir   = "orphans"
	mcastDir     = "mcast"
)

func overlayKey(name string) string               { return overlaysDir + "/" + name }
func vniKey(vni uint32) string                    { return vnisDir + "/" + strconv.FormatUint(uint64(vni), 10) }
func netmapKey(host, netID string) string         { return netmapOf(host) + "/" + netID }
func endpointKey(overlay, id string) string       { return endpointsOf(overlay) + "/" + id }
func macKey(overlay, mac string) string           { return macsDir + "/" + overlay + "/" + mac }
func addrKey(overlay string, a netip.Addr) string { return addrsDir + "/" + overlay + "/" + a.String() }
func hostKey(host string) string                  { return hostsDir + "/" + host }
func seenKey(host string) string                  { return seenDir + "/" + host }
func orphanKey(host, id string) string            { return orphansOf(host) + "/" + id }
func mcastKey(overlay, host string) string        { return mcastDir + "/" + overlay + "/" + host }

// netmapOf, orphansOf and endpointsOf are the directories of one host's
// Docker networks and orphaned endpoints, and of one overlay's endpoints.
func netmapOf(host string) string       { return netmapDir + "/" + host }
func orphansOf(host string) string      { return orphansDir + "/" + host }
func endpointsOf(overlay string) string { return endpointsDir + "/" + overlay }

// overlayOfKey splits endpoints/<overlay>/<id>.
func overlayOfKey(key string) string {
	rest := strings.TrimPrefix(key, endpointsDir+"/")
	name, _, _ := strings.Cut(rest, "/")
	return name
}

// hostOfKey is the <host> of a key below dir: hosts/<host>, seen/<host>,
// netmap/<host>/..., orphans/<host>/....
func hostOfKey(dir, key string) string {
	host, _, _ := strings.Cut(strings.TrimPrefix(key, dir+"/"), "/")
	return host
}

// splitMcastKey splits mcast/<overlay>/<host>.
func splitMcastKey(key string) (overlay, host string, ok bool) {
	return strings.Cut(strings.TrimPrefix(key, mcastDir+"/"), "/")
}

// idOfKey is the last part of a key: the endpoint id of
// endpoints/<overlay>/<id> or orphans/<host>/<id>.
func idOfKey(key string) string { return key[strings.LastIndex(key, "/")+1:] }

// The layout for cmd and for the tests of other packages.
const (
	OverlaysDir  = overlaysDir
	VNIsDir      = vnisDir
	NetmapDir    = netmapDir
	EndpointsDir = endpointsDir
	MACsDir      = macsDir
	AddrsDir     = addrsDir
	HostsDir     = hostsDir
	OrphansDir   = orphansDir
	McastDir     = mcastDir
)

// OverlayKey is the key of overlay name's record.
func OverlayKey(name string) string { return overlayKey(name) }

// VNIKey is the key holding the name of the overlay with vni.
func VNIKey(vni uint32) string { return vniKey(vni) }

// EndpointKey is the key of an endpoint's record.
func EndpointKey(overlay, id string) string { return endpointKey(overlay, id) }

// OverlayEndpoints is the directory of an overlay's endpoint records.
func OverlayEndpoints(overlay string) string { return endpointsOf(overlay) }

// HostKey is a host's live key.
func HostKey(host string) string { return hostKey(host) }

// SeenKey is the key of a host's last-seen time.
func SeenKey(host string) string { return seenKey(host) }

// HostNetworks and HostOrphans are the directories of a host's Docker
// networks and of its orphaned endpoints.
func HostNetworks(host string) string { return netmapOf(host) }
func HostOrphans(host string) string  { return orphansOf(host) }
