package ipam

import (
	"net/netip"
	"strings"
)

// Store layout, below the store's own prefix:
//
//	ipam/spaces/<space>                 JSON, one per address space: its
//	                                    subnets, each subnet's gateway and
//	                                    pools, each pool's refs per host.
//	                                    Changed only by pool and gateway
//	                                    requests, always compare-and-swap.
//	ipam/addrs/<space>/<subnet>/<ip>    JSON Allocation, one per allocated
//	                                    address (subnet written 10.20.0.0_24):
//	                                    kind, pool, host, endpoint, refs.
//	                                    Created only if absent, so no address
//	                                    is ever handed out twice.
//	ipam/hints/<space>/<subnet>/<range> text: where the pool's next dynamic
//	                                    allocation should start; written in
//	                                    the same transaction as each one.
const (
	// Dir holds every record of the IPAM driver.
	Dir = "ipam"
	// AddrsDir holds the allocated addresses of every address space.
	AddrsDir  = Dir + "/addrs"
	spacesDir = Dir + "/spaces"
	hintsDir  = Dir + "/hints"
)

// seg writes a prefix as one key segment: 10.20.0.0/24 -> 10.20.0.0_24.
func seg(p netip.Prefix) string { return strings.Replace(p.String(), "/", "_", 1) }

func spaceKey(space string) string   { return spacesDir + "/" + space }
func spaceAddrs(space string) string { return AddrsDir + "/" + space }

func (p poolSpec) addrDir() string             { return spaceAddrs(p.Space) + "/" + seg(p.Subnet) }
func (p poolSpec) addrKey(a netip.Addr) string { return p.addrDir() + "/" + a.String() }
func (p poolSpec) hintKey() string {
	return hintsDir + "/" + p.Space + "/" + seg(p.Subnet) + "/" + seg(p.Range)
}

// addrOfKey is the address of a key below p.addrDir().
func (p poolSpec) addrOfKey(key string) (netip.Addr, error) {
	return netip.ParseAddr(strings.TrimPrefix(key, p.addrDir()+"/"))
}
