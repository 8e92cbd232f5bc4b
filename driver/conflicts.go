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

// pickPeers chooses the peers of one overlay from its records of live
// hosts, sorted by key: the records of hosts other than self that are
// well-formed and claim no MAC or address a record before them claims.
// under is this host's underlay address (invalid: no host's view). It
// returns the peers, by MAC, and the skipped records, self's included.
func pickPeers(overlay string, recs []keyedRecord, self string, under netip.Addr) ([]Peer, []RecordProblem) {
	held := map[string]holding{}
	var peers []Peer
	var skipped []RecordProblem
	for _, k := range recs {
		skip := func(kind, reason string, with holding) {
			skipped = append(skipped, RecordProblem{
				Overlay: overlay, Endpoint: k.id(), Host: k.rec.Host, IPv4: k.rec.IPv4, IPv6: k.rec.IPv6, MAC: k.rec.MAC,
				Kind: kind, Reason: reason, ConflictsWith: with.id, ConflictHost: with.host,
			})
		}
		peer, err := validPeer(k.rec, under)
		if err != nil {
			skip(SkipInvalid, err.Error(), holding{})
			continue
		}
		claims := claimsOf(overlay, k.rec)
		conflict := false
		for _, c := range claims {
			if h, ok := held[c.Key]; ok {
				skip(SkipConflict, fmt.Sprintf("%s is held by endpoint %.12s on host %s", c.What, h.id, h.host), h)
				conflict = true
				break
			}
		}
		if conflict {
			continue
		}
		for _, c := range claims {
			held[c.Key] = holding{k.id(), k.rec.Host}
		}
		if k.rec.Host != self {
			peers = append(peers, peer)
		}
	}
	sort.Slice(peers, func(i, j int) bool { return peers[i].MAC.String() < peers[j].MAC.String() })
	return peers, skipped
}

// validPeer turns an endpoint record of another host into a Peer, or says
// what is wrong with it: what the kernel would refuse, or what would
// break the overlay.
func validPeer(rec endpointRecord, under netip.Addr) (Peer, error) {
	peer, err := peerOf(rec)
	if err != nil {
		return Peer{}, fmt.Errorf("malformed record: %v", err)
	}
	h := peer.Host
	switch {
	case h.IsUnspecified() || h.IsMulticast() || h.Zone() != "":
		return Peer{}, fmt.Errorf("host address %s is not a host's", h)
	case under.IsValid() && h.Unmap().Is4() != under.Is4():
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
	}
	return peer, nil
}

// recordProblems finds, over every overlay, the records of live hosts that
// the rules above skip (live nil: of every host): what status and doctor
// show.
func recordProblems(endpoints map[string]endpointRecord, live func(host string) bool) []RecordProblem {
	byOverlay := map[string][]keyedRecord{}
	for key, rec := range endpoints {
		if live != nil && !live(rec.Host) {
			continue
		}
		ov := overlayOfKey(key)
		byOverlay[ov] = append(byOverlay[ov], keyedRecord{key, rec})
	}
	var out []RecordProblem
	for ov, recs := range byOverlay {
		sortKeyed(recs)
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
