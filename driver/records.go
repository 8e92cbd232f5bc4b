package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strconv"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Store layout, below the store's own prefix:
//
//	overlays/<name>               overlayRecord: the cluster-wide overlay, with the hosts using it
//	vnis/<vni>                    the overlay name holding that VNI (keeps VNIs unique)
//	netmap/<host>/<network id>    networkRecord: which overlay a host's Docker network is
//	endpoints/<overlay>/<ep id>   endpointRecord: one container interface, on one host
//	hosts/<host>                  hostRecord, a live key: gone when the host's plugin dies
//
// <host> is the host's underlay (advertise) address.
const (
	overlaysDir  = "overlays"
	vnisDir      = "vnis"
	netmapDir    = "netmap"
	endpointsDir = "endpoints"
	hostsDir     = "hosts"
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
	// Swarm is the Docker network ID of the swarm network the overlay
	// belongs to; empty for an overlay of plain hosts' networks. The two
	// kinds never share an overlay: their addresses come from different
	// allocators.
	Swarm string `json:"swarm,omitempty"`
	// Allocated: the swarm manager holds the overlay (from AllocateNetwork
	// until FreeNetwork), whether or not a host uses it.
	Allocated bool `json:"allocated,omitempty"`
}

type networkRecord struct {
	Overlay  string `json:"overlay"`
	Internal bool   `json:"internal,omitempty"`
	MTU      int    `json:"mtu,omitempty"`
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
}

func overlayKey(name string) string         { return overlaysDir + "/" + name }
func vniKey(vni uint32) string              { return vnisDir + "/" + strconv.FormatUint(uint64(vni), 10) }
func netmapKey(host, netID string) string   { return netmapDir + "/" + host + "/" + netID }
func endpointKey(overlay, id string) string { return endpointsDir + "/" + overlay + "/" + id }
func hostKey(host string) string            { return hostsDir + "/" + host }

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

// joinOverlay creates the overlay of spec, or checks that it matches the
// existing one, and adds host to its users.
func joinOverlay(ctx context.Context, s store.Store, spec netSpec, host string) (overlayRecord, error) {
	return claimOverlay(ctx, s, spec, func(rec *overlayRecord) bool {
		if slices.Contains(rec.Hosts, host) {
			return false
		}
		rec.Hosts = append(rec.Hosts, host)
		return true
	})
}

// allocateOverlay creates the overlay of a swarm network, or checks that
// it matches the existing one, and marks it held by the swarm manager.
func allocateOverlay(ctx context.Context, s store.Store, spec netSpec) (overlayRecord, error) {
	return claimOverlay(ctx, s, spec, func(rec *overlayRecord) bool {
		if rec.Allocated {
			return false
		}
		rec.Allocated = true
		return true
	})
}

// claimOverlay creates the overlay of spec, or checks that it matches the
// existing one, and applies claim to it (claim reports whether it changed
// the record).
func claimOverlay(ctx context.Context, s store.Store, spec netSpec, claim func(rec *overlayRecord) bool) (overlayRecord, error) {
	key := overlayKey(spec.Overlay)
	for try := 0; try < casRetries; try++ {
		kv, err := s.Get(ctx, key)
		if errors.Is(err, store.ErrNotFound) {
			rec := newOverlayRecord(spec)
			claim(&rec)
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
		if !claim(&rec) {
			return rec, nil
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
	rec := overlayRecord{Name: spec.Overlay, Encap: spec.Encap, Subnets: subnetStrings(spec.Subnets), MTU: spec.MTU, Swarm: spec.Swarm}
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

// leaveOverlay removes host from the overlay's users and deletes the
// overlay (and frees its VNI) when nothing uses it any more.
func leaveOverlay(ctx context.Context, s store.Store, name, host string) error {
	return releaseOverlay(ctx, s, name, func(rec *overlayRecord) {
		rec.Hosts = slices.DeleteFunc(rec.Hosts, func(h string) bool { return h == host })
	})
}

// freeOverlay drops the swarm manager's hold on the overlay and deletes it
// (and frees its VNI) when no host uses it any more.
func freeOverlay(ctx context.Context, s store.Store, name string) error {
	return releaseOverlay(ctx, s, name, func(rec *overlayRecord) { rec.Allocated = false })
}

// releaseOverlay applies release to the overlay's record and deletes the
// overlay, with its VNI, when neither a host nor the swarm manager holds it.
func releaseOverlay(ctx context.Context, s store.Store, name string, release func(rec *overlayRecord)) error {
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
		release(&rec)
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
