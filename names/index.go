package names

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/dnplabs/docker-net-plugin/driver"
)

// index is what the name servers answer from: one immutable snapshot,
// rebuilt whenever the store or this host's containers change.
type index struct {
	// addrs: overlay -> lower-case name -> the addresses of every live
	// endpoint that has the name on that overlay (IPv4 and IPv6, sorted).
	addrs map[string]map[string][]netip.Addr
	// ptr: overlay -> address -> "<container name>.<network name>".
	ptr map[string]map[netip.Addr]string
	// scope: overlay -> IPv4 address of an endpoint of this host -> the
	// overlays of every endpoint in the same container (its own first).
	scope map[string]map[netip.Addr][]string
}

// indexInput is what an index is built from.
type indexInput struct {
	host      string                 // this host
	endpoints []driver.KnownEndpoint // every endpoint in the store
	live      map[string]bool        // live hosts
	records   map[string]record      // names/<overlay>/<id> -> record
	sandboxes map[string]string      // endpoint id -> sandbox key, this host's
}

func buildIndex(in indexInput) *index {
	ix := &index{
		addrs: map[string]map[string][]netip.Addr{},
		ptr:   map[string]map[netip.Addr]string{},
		scope: map[string]map[netip.Addr][]string{},
	}
	bySandbox := map[string][]driver.KnownEndpoint{}
	for _, ep := range in.endpoints {
		if ep.Host == in.host {
			if sb := in.sandboxes[ep.ID]; sb != "" {
				bySandbox[sb] = append(bySandbox[sb], ep)
			}
		}
		if !in.live[ep.Host] {
			continue // a lost host's names go with its endpoints
		}
		rec, ok := in.records[recordKey(ep.Overlay, ep.ID)]
		if !ok || rec.Host != ep.Host {
			continue
		}
		for _, a := range []netip.Addr{ep.IPv4, ep.IPv6} {
			if !a.IsValid() {
				continue
			}
			for _, n := range rec.Names {
				m := ix.addrs[ep.Overlay]
				if m == nil {
					m = map[string][]netip.Addr{}
					ix.addrs[ep.Overlay] = m
				}
				n = strings.ToLower(n)
				if !slices.Contains(m[n], a) {
					m[n] = append(m[n], a)
				}
			}
			if rec.Name != "" {
				p := ix.ptr[ep.Overlay]
				if p == nil {
					p = map[netip.Addr]string{}
					ix.ptr[ep.Overlay] = p
				}
				p[a] = rec.Name + "." + rec.Network
			}
		}
	}
	for _, m := range ix.addrs {
		for n := range m {
			slices.SortFunc(m[n], func(a, b netip.Addr) int { return a.Compare(b) })
		}
	}
	// Local endpoints: which overlays a query from each of them may see.
	for _, ep := range in.endpoints {
		if ep.Host != in.host || !ep.IPv4.IsValid() {
			continue
		}
		overlays := []string{ep.Overlay}
		if sb := in.sandboxes[ep.ID]; sb != "" {
			for _, o := range bySandbox[sb] {
				if !slices.Contains(overlays, o.Overlay) {
					overlays = append(overlays, o.Overlay)
				}
			}
		}
		m := ix.scope[ep.Overlay]
		if m == nil {
			m = map[netip.Addr][]string{}
			ix.scope[ep.Overlay] = m
		}
		m[ep.IPv4] = overlays
	}
	return ix
}

// overlaysFor is the overlays whose names a query that came in on overlay
// from src may see: those of the container src belongs to, or just overlay.
func (ix *index) overlaysFor(overlay string, src netip.Addr) []string {
	if s, ok := ix.scope[overlay][src.Unmap()]; ok {
		return s
	}
	return []string{overlay}
}

// lookup returns the addresses of name on the given overlays, and whether
// the name exists there at all.
func (ix *index) lookup(overlays []string, name string) ([]netip.Addr, bool) {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	var out []netip.Addr
	found := false
	for _, o := range overlays {
		addrs, ok := ix.addrs[o][name]
		if !ok {
			continue
		}
		found = true
		for _, a := range addrs {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return out, found
}

// reverse returns the name of addr on the given overlays, or "".
func (ix *index) reverse(overlays []string, addr netip.Addr) string {
	for _, o := range overlays {
		if n, ok := ix.ptr[o][addr]; ok {
			return n
		}
	}
	return ""
}
