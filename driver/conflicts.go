package driver

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
)

// One bad record costs only itself. The peer sync programs, per overlay,
// each MAC and each address once. An endpoint record that is malformed, or
// claims a MAC or address another record of the overlay claims too, is
// skipped; the rest of the overlay is programmed as usual.
//
// Which of two claimants keeps a MAC or address: the record with the
// lowest key (endpoints/<overlay>/<id>), on every host alike, this host's
// own records included (a container of this host that loses is cut off,
// as it is everywhere else). CreateEndpoint claims MACs and addresses in
// the store (claims.go), so such conflicts come only from records written
// some other way: by an earlier version, another tool, or a hand.

// Reasons a record is skipped, as counted in the metrics.
const (
	SkipInvalid  = "invalid"
	SkipConflict = "conflict"
)

// keyedRecord is an endpoint record with its store key.
type keyedRecord struct {
	key string
	rec endpointRecord
}

func (k keyedRecord) id() string { return k.key[strings.LastIndex(k.key, "/")+1:] }

// holding is who holds a MAC or address while peers are picked.
type holding struct{ id, host string }

// claimKey is a MAC (ip invalid) or an address (mac zero) an endpoint
// claims in its overlay.
type claimKey struct {
	mac [6]byte
	ip  netip.Addr
}

func (k claimKey) String() string {
	if k.ip.IsValid() {
		return "address " + k.ip.String()
	}
	return "MAC " + net.HardwareAddr(k.mac[:]).String()
}

// peerClaims are the MAC and addresses of a valid peer.
func peerClaims(p Peer) []claimKey {
	out := make([]claimKey, 0, 1+len(p.IPs))
	out = append(out, claimKey{mac: [6]byte(p.MAC)})
	for _, ip := range p.IPs {
		out = append(out, claimKey{ip: ip})
	}
	return out
}

// pickPeers chooses the peers of overlay ov from its records of live
// hosts, sorted by key: the records of hosts other than self that are
// well-formed and claim no MAC or address a record before them claims.
// ov.Subnets, when known, bound the addresses. under is this host's
// underlay address (invalid: no host's view). It returns the peers, by
// MAC, and the skipped records, self's included.
func pickPeers(ov Overlay, recs []keyedRecord, self string, under netip.Addr) ([]Peer, []RecordProblem) {
	picked, skipped, _ := pick(ov, recs, self, under)
	return sortedPeers(picked), skipped
}

// sortedPeers are the peers by MAC.
func sortedPeers(picked map[string]Peer) []Peer {
	peers := make([]Peer, 0, len(picked))
	for _, p := range picked {
		peers = append(peers, p)
	}
	sort.Slice(peers, func(i, j int) bool { return bytes.Compare(peers[i].MAC, peers[j].MAC) < 0 })
	return peers
}

// pick is pickPeers with the peers by record key. It also counts, for
// every MAC and address claim, the well-formed records making it.
func pick(ov Overlay, recs []keyedRecord, self string, under netip.Addr) (map[string]Peer, []RecordProblem, map[claimKey]int) {
	overlay := ov.Name
	held := make(map[claimKey]holding, 2*len(recs))
	counts := make(map[claimKey]int, 2*len(recs))
	peers := make(map[string]Peer, len(recs))
	var skipped []RecordProblem
	for _, k := range recs {
		skip := func(kind, reason string, with holding) {
			skipped = append(skipped, RecordProblem{
				Overlay: overlay, Endpoint: k.id(), Host: k.rec.Host, IPv4: k.rec.IPv4, IPv6: k.rec.IPv6, MAC: k.rec.MAC,
				Kind: kind, Reason: reason, ConflictsWith: with.id, ConflictHost: with.host,
			})
		}
		peer, err := validPeer(k.rec, ov, under)
		if err != nil {
			skip(SkipInvalid, err.Error(), holding{})
			continue
		}
		claims := peerClaims(peer)
		for _, c := range claims {
			counts[c]++
		}
		conflict := false
		for _, c := range claims {
			if h, ok := held[c]; ok {
				skip(SkipConflict, fmt.Sprintf("%s is held by endpoint %.12s on host %s", c, h.id, h.host), h)
				conflict = true
				break
			}
		}
		if conflict {
			continue
		}
		for _, c := range claims {
			held[c] = holding{k.id(), k.rec.Host}
		}
		if k.rec.Host != self {
			peers[k.key] = peer
		}
	}
	return peers, skipped, counts
}

// validPeer turns an endpoint record of another host into a Peer, or says
// what is wrong with it. Records in the store are untrusted input: a
// hostile or broken one must not hijack traffic (a broadcast or multicast
// MAC, the gateway's address), point tunnels at nowhere (an unspecified,
// multicast, loopback or link-local underlay address), or make the kernel refuse the whole peer set (an address family
// the tunnels cannot reach).
func validPeer(rec endpointRecord, ov Overlay, under netip.Addr) (Peer, error) {
	peer, err := peerOf(rec)
	if err != nil {
		return Peer{}, fmt.Errorf("malformed record: %v", err)
	}
	h := peer.Host
	switch {
	case h.String() != rec.Host:
		return Peer{}, fmt.Errorf("host address %q is not written canonically (%s)", rec.Host, h)
	case h.IsUnspecified() || h.IsMulticast() || h.IsLoopback() || h.IsLinkLocalUnicast() || h.Zone() != "":
		return Peer{}, fmt.Errorf("host address %s is not a host's", h)
	case under.IsValid() && h.Is4() != under.Is4():
		return Peer{}, fmt.Errorf("host address %s is not of the underlay's family (%s)", h, under)
	case len(peer.MAC) != 6 || peer.MAC[0]&1 != 0 || bytes.Equal(peer.MAC, make(net.HardwareAddr, 6)):
		return Peer{}, fmt.Errorf("MAC %q is not a unicast MAC", rec.MAC)
	}
	if rec.IPv4 == "" {
		return Peer{}, fmt.Errorf("no IPv4 address")
	}
	for i, ip := range peer.IPs {
		if !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip.Zone() != "" {
			return Peer{}, fmt.Errorf("address %s is not an endpoint's", ip)
		}
		if i == 0 && !ip.Is4() {
			return Peer{}, fmt.Errorf("IPv4 address %s is not IPv4", ip)
		}
		if i == 1 && (!ip.Is6() || ip.Is4In6()) {
			return Peer{}, fmt.Errorf("IPv6 address %s is not IPv6", ip)
		}
		if err := checkPeerIP(ip, ov); err != nil {
			return Peer{}, err
		}
	}
	return peer, nil
}

// checkPeerIP: an endpoint address is inside one of the overlay's subnets
// (when they are known), and is neither its network, broadcast nor
// gateway address.
func checkPeerIP(ip netip.Addr, ov Overlay) error {
	if len(ov.Subnets) == 0 {
		return nil
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

// recordProblems finds, over every overlay, the records of live hosts that
// the rules above skip (live nil: of every host): what status and doctor
// show. overlays gives what is known of each overlay (its subnets bound
// the addresses); an overlay it lacks is checked without them.
func recordProblems(endpoints map[string]endpointRecord, overlays map[string]Overlay, live func(host string) bool) []RecordProblem {
	byOverlay := map[string][]keyedRecord{}
	for key, rec := range endpoints {
		if live != nil && !live(rec.Host) {
			continue
		}
		ov := overlayOfKey(key)
		byOverlay[ov] = append(byOverlay[ov], keyedRecord{key, rec})
	}
	var out []RecordProblem
	for name, recs := range byOverlay {
		sortKeyed(recs)
		ov, ok := overlays[name]
		if !ok {
			ov = Overlay{Name: name}
		}
		_, skipped := pickPeers(ov, recs, "", netip.Addr{})
		out = append(out, skipped...)
	}
	sortProblems(out)
	return out
}

func sortKeyed(recs []keyedRecord) {
	sort.Slice(recs, func(i, j int) bool { return recs[i].key < recs[j].key })
}

func sortProblems(ps []RecordProblem) {
	sort.Slice(ps, func(i, j int) bool {
		if ps[i].Overlay != ps[j].Overlay {
			return ps[i].Overlay < ps[j].Overlay
		}
		return ps[i].Endpoint < ps[j].Endpoint
	})
}
