package names

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/store"
)

// record is what one endpoint is called on its overlay.
type record struct {
	Host      string   `json:"host"`      // underlay address of the endpoint's host
	Container string   `json:"container"` // Docker container id
	Name      string   `json:"name"`      // container name (no leading "/")
	Network   string   `json:"network"`   // the Docker network's name on its host
	Names     []string `json:"names"`     // every name it answers to, lower case, sorted
	// What its host needs back after a plugin restart: the container's
	// sandbox and the prefix length of the route Join gave it.
	Sandbox string `json:"sandbox,omitempty"`
	Route   int    `json:"route,omitempty"`
}

func (r record) equal(o record) bool {
	return r.Host == o.Host && r.Container == o.Container && r.Name == o.Name && r.Network == o.Network &&
		slices.Equal(r.Names, o.Names) && r.Sandbox == o.Sandbox && r.Route == o.Route
}

func encodeRecord(r record) []byte {
	b, err := json.Marshal(r)
	if err != nil {
		panic(fmt.Sprintf("encode name record: %v", err)) // a plain struct of strings
	}
	return b
}

func decodeRecord(kv store.KV) (record, error) {
	var r record
	if err := json.Unmarshal(kv.Value, &r); err != nil {
		return r, fmt.Errorf("corrupt name record %s: %w", kv.Key, err)
	}
	return r, nil
}

// nameSet is names lower-cased, without empties and duplicates, sorted.
func nameSet(names ...[]string) []string {
	var out []string
	for _, ns := range names {
		for _, n := range ns {
			n = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(n, "/"), "."))
			if n != "" && !slices.Contains(out, n) {
				out = append(out, n)
			}
		}
	}
	slices.Sort(out)
	return out
}

// Route slots. Every endpoint of this plugin gets a route to the name
// server's address through its own interface. A container on several
// overlays of the plugin gets one route per overlay, each with another
// prefix length (/32, /31, ... /24) so that they never clash; the most
// specific one carries the queries, and the server answers for all the
// overlays of the container.
const (
	maxRouteBits = 32
	minRouteBits = 24
)

// pickRoute returns the longest prefix length not in used, or 0 when all
// are taken.
func pickRoute(used []int) int {
	for bits := maxRouteBits; bits >= minRouteBits; bits-- {
		if !slices.Contains(used, bits) {
			return bits
		}
	}
	return 0
}

// staticRoute is a route to addr/bits on the endpoint's own interface.
func staticRoute(addr netip.Addr, bits int) *network.StaticRoute {
	return &network.StaticRoute{
		Destination: netip.PrefixFrom(addr, bits).Masked().String(),
		RouteType:   connectedRoute,
	}
}

// connectedRoute is libnetwork's route type "connected": a route to the
// destination through the endpoint's interface, no next hop.
const connectedRoute = 1
