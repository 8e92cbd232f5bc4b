package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"

	"github.com/dnplabs/docker-net-plugin/store"
)

type overlayRecord struct {
	Name    string   `json:"name"`
	VNI     uint32   `json:"vni"`
	Encap   string   `json:"encap"`
	Subnets []string `json:"subnets"`
	// Gateways, one per subnet ("" for none): the same address sits on the
	// overlay's bridge on every host (a distributed gateway).
	Gateways []string `json:"gateways,omitempty"`
	MTU      int      `json:"mtu,omitempty"` // set only when a user gave -o mtu
	Hosts    []string `json:"hosts"`         // hosts with a Docker network on this overlay
	// Members are the hosts in Hosts with their Docker networks on the
	// overlay, changed in the same compare-and-swap as Hosts. A host in
	// Hosts without an entry was recorded by an earlier version, which
	// kept no count: it stays a member until its netmap shows no network
	// on the overlay, and gets an entry the next time it joins or leaves.
	Members map[string]*member `json:"members,omitempty"`
	// UncoordinatedIPAM: the addresses come from another IPAM driver than
	// the plugin's, each host's from the ranges it declared (its member's
	// Ranges), which no two hosts share.
	UncoordinatedIPAM bool `json:"uncoordinated_ipam,omitempty"`
	// Encrypted: VXLAN between the hosts is encrypted (-o encrypted).
	Encrypted bool `json:"encrypted,omitempty"`
	// Swarm is the Docker network ID of the swarm network the overlay
	// belongs to; empty for an overlay of plain hosts' networks. The two
	// kinds never share an overlay: their addresses come from different
	// allocators.
	Swarm string `json:"swarm,omitempty"`
	// Allocated: the swarm manager holds the overlay (from AllocateNetwork
	// until FreeNetwork), whether or not a host uses it.
	Allocated bool `json:"allocated,omitempty"`
}

// member is one host's part in an overlay.
type member struct {
	Networks []string `json:"networks"`      // its Docker networks on the overlay
	MTU      int      `json:"mtu,omitempty"` // its containers' MTU there; 0: not known
	// Ranges, for an overlay of uncoordinated IPAM: where this host's
	// addresses come from.
	Ranges []string `json:"ipam_ranges,omitempty"`
}

type networkRecord struct {
	Overlay  string `json:"overlay"`
	Internal bool   `json:"internal,omitempty"`
	MTU      int    `json:"mtu,omitempty"`
	// IPAMRanges, for a network of uncoordinated IPAM: the ranges its
	// endpoints' addresses must be in.
	IPAMRanges []string `json:"ipam_ranges,omitempty"`
}

type endpointRecord struct {
	Network string `json:"network"` // Docker network id on its host
	Host    string `json:"host"`    // underlay address of its host
	IPv4    string `json:"ipv4,omitempty"`
	IPv6    string `json:"ipv6,omitempty"`
	MAC     string `json:"mac"`
}

type hostRecord struct {
	Addr    string `json:"addr"`
	ID      string `json:"id,omitempty"` // the machine's identity (identity.go)
	Name    string `json:"name"`
	Started string `json:"started"`
	// Key is the host's public key for encrypted overlays (X25519,
	// base64); empty if the host cannot encrypt.
	Key string `json:"key,omitempty"`
}

func encode(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("encode %T: %v", v, err)) // only our own plain structs get here
	}
	return b
}

func decodeKV[T any](kv store.KV) (T, error) {
	var v T
	if err := json.Unmarshal(kv.Value, &v); err != nil {
		return v, fmt.Errorf("corrupt store record %s: %w", kv.Key, err)
	}
	return v, nil
}

func subnetStrings(ps []netip.Prefix) []string {
	out := make([]string, len(ps))
	for i, p := range ps {
		out[i] = p.String()
	}
	return out
}

// compatible says why spec cannot join the existing overlay rec, if it cannot.
func compatible(rec overlayRecord, spec netSpec) error {
	if want := subnetStrings(spec.Subnets); !slices.Equal(rec.Subnets, want) {
		return fmt.Errorf("overlay %q already exists with subnets %v, not %v: use the same --subnet on every host, or another -o overlay name", rec.Name, rec.Subnets, want)
	}
	if spec.VNI != 0 && spec.VNI != rec.VNI {
		return fmt.Errorf("overlay %q already exists with vni %d, not %d", rec.Name, rec.VNI, spec.VNI)
	}
	if spec.Encap != rec.Encap {
		return fmt.Errorf("overlay %q already exists with encap %s, not %s", rec.Name, rec.Encap, spec.Encap)
	}
	switch {
	case spec.Uncoordinated && !rec.UncoordinatedIPAM:
		return fmt.Errorf("overlay %q takes its addresses from the plugin's IPAM driver: a network whose addresses come from another IPAM driver cannot join it (create it with --ipam-driver as on the other hosts)", rec.Name)
	case !spec.Uncoordinated && rec.UncoordinatedIPAM:
		return fmt.Errorf("overlay %q takes its addresses from another IPAM driver, each host from the range it declares with -o %s: a network with the plugin's IPAM cannot join it", rec.Name, OptIPAMRange)
	case rec.Encrypted && !spec.Encrypted:
		return fmt.Errorf("overlay %q already exists encrypted (on hosts %v): create it with -o encrypted here too", rec.Name, rec.Hosts)
	case !rec.Encrypted && spec.Encrypted:
		return fmt.Errorf("overlay %q already exists unencrypted (on hosts %v): create it without -o encrypted, or use another -o overlay name", rec.Name, rec.Hosts)
	}
	switch {
	case rec.Swarm == spec.Swarm:
	case spec.Swarm == "":
		return fmt.Errorf("overlay %q belongs to swarm network %.12s: a plain network cannot join it; use another --subnet or -o overlay name", rec.Name, rec.Swarm)
	case rec.Swarm == "":
		return fmt.Errorf("overlay %q is used by plain (non-swarm) networks on hosts %v: a swarm network needs an overlay of its own; use another --subnet or -o overlay name", rec.Name, rec.Hosts)
	default:
		return fmt.Errorf("overlay %q belongs to swarm network %.12s: use another --subnet or -o overlay name", rec.Name, rec.Swarm)
	}
	return nil
}

// casRetries bounds optimistic retries of one read-modify-write.
const casRetries = 20

// joining is a Docker network of one host joining an overlay.
type joining struct {
	Host    string
	Network string
	// MaxMTU is the largest MTU this host's underlay carries with the
	// overlay's encapsulation (DataPlane.MaxMTU).
	MaxMTU int
}

// joinOverlay creates the overlay of spec, or checks that it matches the
// existing one, and adds the network to its members. Every host of an
// overlay must run it at one MTU, and the ranges hosts declare for
// uncoordinated IPAM must not overlap.
func joinOverlay(ctx context.Context, s store.Store, spec netSpec, j joining) (overlayRecord, error) {
	return claimOverlay(ctx, s, spec, func(rec *overlayRecord) (bool, error) {
		mtu, err := memberMTU(rec, spec, j)
		if err != nil {
			return false, err
		}
		ranges := subnetStrings(spec.Ranges)
		for _, h := range sortedMembers(rec) {
			m := rec.Members[h]
			if m.MTU != 0 && m.MTU != mtu {
				why := "this host's underlay MTU minus the encapsulation overhead"
				if spec.MTU != 0 || rec.MTU != 0 {
					why = "-o mtu"
				}
				return false, fmt.Errorf("overlay %q runs at MTU %d on host %s, but would get %d here (%s): every host of an overlay needs the same MTU; give -o mtu=%d here (or the same -o mtu on every host)", rec.Name, m.MTU, h, mtu, why, m.MTU)
			}
			if h == j.Host {
				if len(m.Ranges) > 0 && !slices.Equal(m.Ranges, ranges) {
					return false, fmt.Errorf("this host declared -o %s=%s for overlay %q with another network already: use the same ranges", OptIPAMRange, strings.Join(m.Ranges, ","), rec.Name)
				}
				continue
			}
			if err := disjoint(rec.Name, h, m.Ranges, spec.Ranges); err != nil {
				return false, err
			}
		}
		own := rec.Members[j.Host]
		if own == nil {
			own = &member{}
			if slices.Contains(rec.Hosts, j.Host) {
				// Recorded by an earlier version: count the networks it has.
				if own.Networks, err = hostNetworksOn(ctx, s, j.Host, rec.Name); err != nil {
					return false, err
				}
			}
		}
		if slices.Contains(own.Networks, j.Network) && own.MTU == mtu && slices.Equal(own.Ranges, ranges) {
			return false, nil
		}
		if !slices.Contains(own.Networks, j.Network) {
			own.Networks = append(own.Networks, j.Network)
		}
		own.MTU, own.Ranges = mtu, ranges
		if rec.Members == nil {
			rec.Members = map[string]*member{}
		}
		rec.Members[j.Host] = own
		if !slices.Contains(rec.Hosts, j.Host) {
			rec.Hosts = append(rec.Hosts, j.Host)
		}
		return true, nil
	})
}

// memberMTU is the MTU a network of spec gets on the overlay rec on the
// host joining: its -o mtu, else the overlay's, else the most the
// underlay carries.
func memberMTU(rec *overlayRecord, spec netSpec, j joining) (int, error) {
	if spec.MTU != 0 && rec.MTU != 0 && spec.MTU != rec.MTU {
		return 0, fmt.Errorf("overlay %q has MTU %d, not %d: use the same -o mtu on every host (or none: the overlay's is used)", rec.Name, rec.MTU, spec.MTU)
	}
	mtu := spec.MTU
	if mtu == 0 {
		mtu = rec.MTU
	}
	if mtu == 0 {
		return j.MaxMTU, nil
	}
	if j.MaxMTU > 0 && mtu > j.MaxMTU {
		return 0, fmt.Errorf("overlay %q has MTU %d, more than this host's underlay carries with %s (%d)", rec.Name, mtu, rec.Encap, j.MaxMTU)
	}
	return mtu, nil
}

// disjoint says which of ranges overlaps one that host declared (theirs).
func disjoint(overlay, host string, theirs []string, ranges []netip.Prefix) error {
	for _, t := range theirs {
		tp, err := netip.ParsePrefix(t)
		if err != nil {
			continue
		}
		for _, r := range ranges {
			if tp.Overlaps(r) {
				return fmt.Errorf("-o %s=%s overlaps %s, the range host %s declared on overlay %q: give each host a range of its own", OptIPAMRange, r, tp, host, overlay)
			}
		}
	}
	return nil
}

// sortedMembers are the hosts with a member entry, in address order.
func sortedMembers(rec *overlayRecord) []string {
	hosts := make([]string, 0, len(rec.Members))
	for h := range rec.Members {
		hosts = append(hosts, h)
	}
	slices.SortFunc(hosts, func(a, b string) int {
		if addrLess(a, b) {
			return -1
		}
		if addrLess(b, a) {
			return 1
		}
		return 0
	})
	return hosts
}

// hostNetworksOn lists the Docker networks host has on overlay name, by
// its netmap (for membership recorded by an earlier version).
func hostNetworksOn(ctx context.Context, s store.Store, host, name string) ([]string, error) {
	kvs, err := s.List(ctx, netmapOf(host))
	if err != nil {
		return nil, fmt.Errorf("networks of host %s: %w", host, err)
	}
	var out []string
	for _, kv := range kvs {
		rec, err := decodeKV[networkRecord](kv)
		if err != nil {
			return nil, err
		}
		if rec.Overlay == name {
			out = append(out, kv.Key[strings.LastIndex(kv.Key, "/")+1:])
		}
	}
	return out, nil
}

// allocateOverlay creates the overlay of a swarm network, or checks that
// it matches the existing one, and marks it held by the swarm manager.
func allocateOverlay(ctx context.Context, s store.Store, spec netSpec) (overlayRecord, error) {
	return claimOverlay(ctx, s, spec, func(rec *overlayRecord) (bool, error) {
		if rec.Allocated {
			return false, nil
		}
		rec.Allocated = true
		return true, nil
	})
}

// claimOverlay creates the overlay of spec, or checks that it matches the
// existing one, and applies claim to it (claim reports whether it changed
// the record, or why it cannot).
func claimOverlay(ctx context.Context, s store.Store, spec netSpec, claim func(rec *overlayRecord) (bool, error)) (overlayRecord, error) {
	key := overlayKey(spec.Overlay)
	for try := 0; try < casRetries; try++ {
		kv, err := s.Get(ctx, key)
		if errors.Is(err, store.ErrNotFound) {
			rec := newOverlayRecord(spec)
			if _, err := claim(&rec); err != nil {
				return rec, err
			}
			rec, err := createOverlay(ctx, s, spec, rec)
			if errors.Is(err, store.ErrConflict) {
				continue // someone else created it first: join theirs
			}
			return rec, err
		}
		if err != nil {
			return overlayRecord{}, err
		}
		rec, err := decodeKV[overlayRecord](kv)
		if err != nil {
			return rec, err
		}
		if err := compatible(rec, spec); err != nil {
			return rec, err
		}
		if changed, err := claim(&rec); err != nil || !changed {
			return rec, err
		}
		if _, err := s.CompareAndSwap(ctx, key, encode(rec), kv.Version); errors.Is(err, store.ErrConflict) {
			continue
		} else if err != nil {
			return rec, err
		}
		return rec, nil
	}
	return overlayRecord{}, fmt.Errorf("overlay %q: too much contention in the store, try again", spec.Overlay)
}

// newOverlayRecord is the record of a new overlay of spec, without users
// and without a VNI yet.
func newOverlayRecord(spec netSpec) overlayRecord {
	rec := overlayRecord{Name: spec.Overlay, Encap: spec.Encap, Subnets: subnetStrings(spec.Subnets), MTU: spec.MTU, Swarm: spec.Swarm,
		UncoordinatedIPAM: spec.Uncoordinated, Encrypted: spec.Encrypted}
	for _, gw := range spec.Gateways {
		if gw.IsValid() {
			rec.Gateways = append(rec.Gateways, gw.String())
		} else {
			rec.Gateways = append(rec.Gateways, "")
		}
	}
	return rec
}

// createOverlay writes rec, a new overlay of spec, and claims a VNI for it
// in one transaction. It returns store.ErrConflict when the overlay
// appeared meanwhile.
func createOverlay(ctx context.Context, s store.Store, spec netSpec, rec overlayRecord) (overlayRecord, error) {
	candidates := vniCandidates(spec)
	for _, vni := range candidates {
		rec.VNI = vni
		err := s.Txn(ctx,
			store.Create(overlayKey(rec.Name), encode(rec)),
			store.Create(vniKey(vni), []byte(rec.Name)))
		if err == nil {
			return rec, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return rec, err
		}
		if _, err := s.Get(ctx, overlayKey(rec.Name)); err == nil {
			return rec, store.ErrConflict
		}
		if spec.VNI != 0 {
			holder, _ := s.Get(ctx, vniKey(vni))
			return rec, fmt.Errorf("vni %d is already used by overlay %q", vni, holder.Value)
		}
	}
	return rec, fmt.Errorf("no free vni found for overlay %q after %d tries", rec.Name, len(candidates))
}

// vniCandidates: the user's VNI, or a few spread from a hash of the name so
// that concurrent creations of different overlays rarely collide.
func vniCandidates(spec netSpec) []uint32 {
	if spec.VNI != 0 {
		return []uint32{spec.VNI}
	}
	const first, span = 4096, 1 << 23
	h := fnv.New32a()
	h.Write([]byte(spec.Overlay))
	start := h.Sum32() % span
	out := make([]uint32, 32)
	for i := range out {
		out[i] = first + (start+uint32(i)*7919)%span
	}
	return out
}

// leaveOverlayNetwork removes one Docker network of host from the
// overlay's members; the host leaves with its last network, and the
// overlay goes (and frees its VNI) when nothing uses it any more.
func leaveOverlayNetwork(ctx context.Context, s store.Store, name, host, netID string) error {
	return releaseOverlay(ctx, s, name, func(rec *overlayRecord) error {
		own := rec.Members[host]
		if own == nil {
			if !slices.Contains(rec.Hosts, host) {
				return nil
			}
			// Recorded by an earlier version: its netmap says what is left.
			nets, err := hostNetworksOn(ctx, s, host, name)
			if err != nil {
				return err
			}
			own = &member{Networks: nets}
		}
		own.Networks = slices.DeleteFunc(own.Networks, func(n string) bool { return n == netID })
		if len(own.Networks) > 0 {
			if rec.Members == nil {
				rec.Members = map[string]*member{}
			}
			rec.Members[host] = own
			return nil
		}
		dropMember(rec, host)
		return nil
	})
}

// leaveOverlay removes host, with all its networks, from the overlay's
// members and deletes the overlay (and frees its VNI) when nothing uses
// it any more: for a host that is gone for good.
func leaveOverlay(ctx context.Context, s store.Store, name, host string) error {
	return releaseOverlay(ctx, s, name, func(rec *overlayRecord) error {
		dropMember(rec, host)
		return nil
	})
}

func dropMember(rec *overlayRecord, host string) {
	delete(rec.Members, host)
	if len(rec.Members) == 0 {
		rec.Members = nil
	}
	rec.Hosts = slices.DeleteFunc(rec.Hosts, func(h string) bool { return h == host })
}

// freeOverlay drops the swarm manager's hold on the overlay and deletes it
// (and frees its VNI) when no host uses it any more.
func freeOverlay(ctx context.Context, s store.Store, name string) error {
	return releaseOverlay(ctx, s, name, func(rec *overlayRecord) error { rec.Allocated = false; return nil })
}

// releaseOverlay applies release to the overlay's record and deletes the
// overlay, with its VNI, when neither a host nor the swarm manager holds it.
func releaseOverlay(ctx context.Context, s store.Store, name string, release func(rec *overlayRecord) error) error {
	key := overlayKey(name)
	for try := 0; try < casRetries; try++ {
		kv, err := s.Get(ctx, key)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		rec, err := decodeKV[overlayRecord](kv)
		if err != nil {
			return err
		}
		if err := release(&rec); err != nil {
			return err
		}
		if len(rec.Hosts) == 0 && !rec.Allocated {
			ops := []store.Op{store.Delete(key, kv.Version)}
			if vkv, err := s.Get(ctx, vniKey(rec.VNI)); err == nil && string(vkv.Value) == name {
				ops = append(ops, store.Delete(vkv.Key, vkv.Version))
			}
			err = s.Txn(ctx, ops...)
		} else {
			_, err = s.CompareAndSwap(ctx, key, encode(rec), kv.Version)
		}
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		return err
	}
	return fmt.Errorf("overlay %q: too much contention in the store, try again", name)
}
