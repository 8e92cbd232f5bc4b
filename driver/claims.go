package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Claims. Two live endpoints of one overlay never share a MAC or an
// address, whatever IPAM driver gave the address: an endpoint record is
// created in one transaction with a claim per MAC and address,
//
//	macs/<overlay>/<mac>    claimRecord
//	addrs/<overlay>/<ip>    claimRecord
//
// each created only if absent, and they are deleted (or orphaned after a
// host loss, hostloss.go) together with the record.

// claimRecord names the endpoint holding a MAC or address of an overlay.
type claimRecord struct {
	Endpoint string `json:"endpoint"`
	Host     string `json:"host"`
	Network  string `json:"network"`
}

// claim is one MAC or address an endpoint record claims.
type claim struct {
	Key  string
	What string // "MAC 02:..." or "address 10.0.0.2", for messages
}

// claimsOf lists the claims of rec on overlay; what does not parse claims
// nothing (CreateEndpoint refuses it before).
func claimsOf(overlay string, rec endpointRecord) []claim {
	var out []claim
	if mac, err := net.ParseMAC(rec.MAC); err == nil {
		out = append(out, claim{macKey(overlay, mac.String()), "MAC " + mac.String()})
	}
	for _, s := range []string{rec.IPv4, rec.IPv6} {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, claim{addrKey(overlay, p.Addr()), "address " + p.Addr().String()})
		}
	}
	return out
}

func claimValue(id string, rec endpointRecord) []byte {
	return encode(claimRecord{Endpoint: id, Host: rec.Host, Network: rec.Network})
}

// claimOps are the operations that create rec's claims.
func claimOps(overlay, id string, rec endpointRecord) []store.Op {
	var ops []store.Op
	for _, c := range claimsOf(overlay, rec) {
		ops = append(ops, store.Create(c.Key, claimValue(id, rec)))
	}
	return ops
}

// createEndpoint records endpoint id of overlay with its claims, in one
// transaction. A MAC or address another endpoint holds is an error that
// names it and its host.
func createEndpoint(ctx context.Context, s store.Store, overlay, id string, rec endpointRecord) error {
	ops := append([]store.Op{store.Create(endpointKey(overlay, id), encode(rec))}, claimOps(overlay, id, rec)...)
	for try := 0; try < casRetries; try++ {
		err := s.Txn(ctx, ops...)
		if err == nil {
			return nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return fmt.Errorf("record endpoint: %w", err)
		}
		if err := explainConflict(ctx, s, overlay, id, rec); err != nil {
			return err
		}
		// What was in the way went meanwhile: try again.
	}
	return fmt.Errorf("record endpoint: too much contention in the store, try again")
}

// explainConflict says why creating endpoint id failed. It removes claims
// left without their endpoint record (by an earlier version, or by this
// endpoint itself) and then returns nil: the caller tries again.
func explainConflict(ctx context.Context, s store.Store, overlay, id string, rec endpointRecord) error {
	if _, err := s.Get(ctx, endpointKey(overlay, id)); err == nil {
		return fmt.Errorf("endpoint already exists")
	} else if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	for _, c := range claimsOf(overlay, rec) {
		kv, err := s.Get(ctx, c.Key)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		holder, err := decodeKV[claimRecord](kv)
		if err != nil {
			return err
		}
		if holder.Endpoint != id {
			if _, err := s.Get(ctx, endpointKey(overlay, holder.Endpoint)); err == nil || !errors.Is(err, store.ErrNotFound) {
				return fmt.Errorf("%s is already used on overlay %q by endpoint %.12s on host %s", c.What, overlay, holder.Endpoint, holder.Host)
			}
		}
		// A claim whose endpoint record is gone holds nothing.
		if err := s.Txn(ctx, store.Delete(kv.Key, kv.Version)); err != nil && !errors.Is(err, store.ErrConflict) {
			return err
		}
	}
	return nil
}

// deleteEndpoint removes endpoint id of overlay with its claims, in one
// transaction. A missing record is not an error.
func deleteEndpoint(ctx context.Context, s store.Store, overlay, id string) error {
	for try := 0; try < casRetries; try++ {
		kv, err := s.Get(ctx, endpointKey(overlay, id))
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		ops := []store.Op{store.Delete(kv.Key, kv.Version)}
		if rec, err := decodeKV[endpointRecord](kv); err == nil {
			more, err := claimDeletes(ctx, s, overlay, id, rec)
			if err != nil {
				return err
			}
			ops = append(ops, more...)
		}
		err = s.Txn(ctx, ops...)
		if errors.Is(err, store.ErrConflict) {
			continue
		}
		return err
	}
	return fmt.Errorf("too much contention in the store, try again")
}

// claimDeletes are the operations that delete the claims endpoint id holds
// (an endpoint recorded by an earlier version may hold none).
func claimDeletes(ctx context.Context, s store.Store, overlay, id string, rec endpointRecord) ([]store.Op, error) {
	var ops []store.Op
	for _, c := range claimsOf(overlay, rec) {
		kv, err := s.Get(ctx, c.Key)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if holder, err := decodeKV[claimRecord](kv); err == nil && holder.Endpoint == id {
			ops = append(ops, store.Delete(kv.Key, kv.Version))
		}
	}
	return ops, nil
}

// claimHolder describes who holds the claim at key on overlay, "" if none.
func claimHolder(ctx context.Context, s store.Store, key string) string {
	kv, err := s.Get(ctx, key)
	if err != nil {
		return ""
	}
	holder, err := decodeKV[claimRecord](kv)
	if err != nil {
		return ""
	}
	return fmt.Sprintf("endpoint %.12s on host %s", holder.Endpoint, holder.Host)
}

// endpointAddr checks an endpoint address Docker gave (with its prefix
// length): of the family asked for, inside one of the overlay's subnets
// with that subnet's length, and not its gateway.
func endpointAddr(n *localNetwork, s string, v6 bool) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, fmt.Errorf("address %q: %v", s, err)
	}
	a := p.Addr()
	switch {
	case a.Zone() != "":
		return p, fmt.Errorf("address %q: zones are not supported", s)
	case v6 && !a.Is6(), v6 && a.Is4In6():
		return p, fmt.Errorf("IPv6 address %q is not an IPv6 address", s)
	case !v6 && !a.Is4():
		return p, fmt.Errorf("IPv4 address %q is not an IPv4 address", s)
	}
	for i, sub := range n.Overlay.Subnets {
		sp, err := netip.ParsePrefix(sub)
		if err != nil || !sp.Contains(a) {
			continue
		}
		if p.Bits() != sp.Bits() {
			return p, fmt.Errorf("address %s has prefix length %d, but subnet %s of overlay %q has %d", a, p.Bits(), sp, n.Overlay.Name, sp.Bits())
		}
		if i < len(n.Overlay.Gateways) && n.Overlay.Gateways[i] == a.String() {
			return p, fmt.Errorf("address %s is the gateway of overlay %q", a, n.Overlay.Name)
		}
		return p, nil
	}
	return p, fmt.Errorf("address %s is outside the subnets %v of overlay %q", a, n.Overlay.Subnets, n.Overlay.Name)
}

// inRanges checks that the addresses of rec, an endpoint of a network of
// uncoordinated IPAM, are inside the ranges this host declared for it. The
// error names the endpoint holding such an address on another host.
func (d *Driver) inRanges(ctx context.Context, n *localNetwork, rec endpointRecord) error {
	if len(n.Rec.IPAMRanges) == 0 {
		return nil
	}
	for _, s := range []string{rec.IPv4, rec.IPv6} {
		if s == "" {
			continue
		}
		a := netip.MustParsePrefix(s).Addr()
		in := false
		for _, r := range n.Rec.IPAMRanges {
			if rp, err := netip.ParsePrefix(r); err == nil && rp.Contains(a) {
				in = true
			}
		}
		if in {
			continue
		}
		msg := fmt.Sprintf("address %s is outside the range %s this host declared for overlay %q (-o %s; give docker network create the same --ip-range)",
			a, strings.Join(n.Rec.IPAMRanges, ","), n.Overlay.Name, OptIPAMRange)
		if holder := claimHolder(ctx, d.cfg.Store, addrKey(n.Overlay.Name, a)); holder != "" {
			msg = fmt.Sprintf("address %s is already used on overlay %q by %s, and is outside the range %s this host declared (-o %s)",
				a, n.Overlay.Name, holder, strings.Join(n.Rec.IPAMRanges, ","), OptIPAMRange)
		}
		return errors.New(msg)
	}
	return nil
}

// unicastMAC parses a MAC an endpoint may have: 6 bytes, unicast, not zero.
func unicastMAC(s string) (net.HardwareAddr, error) {
	mac, err := net.ParseMAC(s)
	switch {
	case err != nil:
		return nil, fmt.Errorf("MAC %q: %v", s, err)
	case len(mac) != 6:
		return nil, fmt.Errorf("MAC %q: want 6 bytes, got %d", s, len(mac))
	case mac[0]&1 != 0:
		return nil, fmt.Errorf("MAC %s is a multicast address: want a unicast one", mac)
	case bytes.Equal(mac, make(net.HardwareAddr, 6)):
		return nil, fmt.Errorf("MAC %s is not a usable address", mac)
	}
	return mac, nil
}

// errSwarmRange: swarm networks need no declared ranges.
var errSwarmRange = fmt.Errorf("option %s is for plain hosts' networks: in swarm mode the manager allocates every address of a network, whatever its IPAM driver; drop the option", OptIPAMRange)

// backfillClaims claims the MACs and addresses of this host's endpoints
// recorded by an earlier version, which wrote no claims, so that no new
// endpoint takes them. Each claim is created in one transaction with a
// rewrite of its endpoint's record, so none outlives an endpoint deleted
// meanwhile. A claim another endpoint already holds is logged.
func (p *peerSync) backfillClaims(ctx context.Context) error {
	s := p.st
	byOverlay := map[string][]string{}
	for key, rec := range p.endpoints {
		if rec.Host == p.host {
			byOverlay[overlayOfKey(key)] = append(byOverlay[overlayOfKey(key)], key)
		}
	}
	var errs []error
	created := 0
	for overlay, keys := range byOverlay {
		held := map[string]claimRecord{}
		for _, dir := range []string{macsDir, addrsDir} {
			kvs, err := s.List(ctx, dir+"/"+overlay)
			if err != nil {
				return err
			}
			for _, kv := range kvs {
				if c, err := decodeKV[claimRecord](kv); err == nil {
					held[kv.Key] = c
				}
			}
		}
		for _, key := range keys {
			id := key[strings.LastIndex(key, "/")+1:]
			rec := p.endpoints[key]
			for _, c := range claimsOf(overlay, rec) {
				if h, ok := held[c.Key]; ok {
					if h.Endpoint != id {
						p.log.Warn("endpoint of this host shares a MAC or address with another endpoint of the overlay (both recorded before claims existed); the peer sync keeps one",
							"overlay", overlay, "endpoint", short(id), "claim", c.What, "holder", short(h.Endpoint), "holder_host", h.Host)
					}
					continue
				}
				kv, err := s.Get(ctx, key)
				if errors.Is(err, store.ErrNotFound) {
					break // deleted meanwhile
				}
				if err != nil {
					errs = append(errs, err)
					break
				}
				err = s.Txn(ctx, store.Update(key, kv.Value, kv.Version), store.Create(c.Key, claimValue(id, rec)))
				switch {
				case err == nil:
					created++
				case errors.Is(err, store.ErrConflict):
					// Claimed or changed meanwhile: the next start looks again.
				default:
					errs = append(errs, err)
				}
			}
		}
	}
	if created > 0 {
		p.log.Info("claimed the MACs and addresses of endpoints recorded by an earlier version", "claims", created)
	}
	return errors.Join(errs...)
}
