package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Held is one endpoint address a host allocated, with its key's version,
// as HostAddresses finds it.
type Held struct {
	Allocation
	Key     string
	Version int64
}

// HostAddresses lists the endpoint addresses (kind address) that host
// allocated in the local address space. The driver releases them when the
// host is lost (store.Delete(h.Key, h.Version) in its own transaction).
// Gateways and auxiliary addresses are shared and stay; the global space
// is the swarm manager's and is left alone.
func HostAddresses(ctx context.Context, s store.Store, host string) ([]Held, error) {
	kvs, err := s.List(ctx, spaceAddrs(LocalSpace))
	if err != nil {
		return nil, fmt.Errorf("list addresses of host %s: %w", host, err)
	}
	var out []Held
	for _, kv := range kvs {
		var rec Allocation
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			return nil, fmt.Errorf("list addresses of host %s: corrupt record %s: %w", host, kv.Key, err)
		}
		if rec.Kind == KindAddress && rec.Host == host {
			out = append(out, Held{Allocation: rec, Key: kv.Key, Version: kv.Version})
		}
	}
	return out, nil
}

// ClaimOp is the transaction operation that allocates rec's address again
// (as released by a host loss): it fails with store.ErrConflict when
// someone else holds the address now.
func ClaimOp(rec Allocation) (store.Op, error) {
	p, err := parsePoolID(rec.Pool)
	if err != nil {
		return store.Op{}, err
	}
	a, err := parseAddr(rec.Address, p)
	if err != nil {
		return store.Op{}, err
	}
	return store.Create(p.addrKey(a), mustJSON(rec)), nil
}

// Holder describes who holds the address of rec now ("" when free), for
// the message about a conflict after a host loss.
func Holder(ctx context.Context, s store.Store, rec Allocation) (string, error) {
	p, err := parsePoolID(rec.Pool)
	if err != nil {
		return "", err
	}
	a, err := parseAddr(rec.Address, p)
	if err != nil {
		return "", err
	}
	cur, _, err := readAllocation(ctx, s, p, a)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return "", nil
		}
		return "", err
	}
	return cur.describe(), nil
}

// PurgeHost releases everything host still holds in the local address
// space, for a host gone for good (the driver purges hosts gone longer
// than a grace period): its endpoint addresses, and its references on
// pools, gateways and auxiliary addresses, which go when no host holds
// them any more, as if the host had released them itself. It returns how
// many allocations and pool references it released.
func PurgeHost(ctx context.Context, s store.Store, host string, log *slog.Logger) (int, error) {
	d := New(s, Options{HostID: host, Logger: log})
	kvs, err := s.List(ctx, spaceAddrs(LocalSpace))
	if err != nil {
		return 0, fmt.Errorf("purge host %s: %w", host, err)
	}
	released := 0
	var errs []error
	for _, kv := range kvs {
		var rec Allocation
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			continue // not this host's to judge; Allocations reports it
		}
		n := rec.Refs[host]
		if rec.Kind == KindAddress && rec.Host == host {
			n = 1
		}
		for range n {
			if _, err := d.Release(ctx, rec.Pool, rec.Address); err != nil && !errors.Is(err, ErrNotAllocated) && !errors.Is(err, ErrNotHeld) {
				errs = append(errs, fmt.Errorf("purge host %s: %w", host, err))
				break
			}
			released++
		}
	}
	rec, _, err := d.readSpace(ctx, LocalSpace)
	if err != nil {
		return released, errors.Join(append(errs, fmt.Errorf("purge host %s: %w", host, err))...)
	}
	for _, e := range rec.Subnets {
		for id, pe := range e.Pools {
			for range pe.Refs[host] {
				if err := d.releasePool(ctx, id); err != nil && !errors.Is(err, ErrNotHeld) && !errors.Is(err, ErrUnknownPool) {
					errs = append(errs, fmt.Errorf("purge host %s: %w", host, err))
					break
				}
				released++
			}
		}
	}
	return released, errors.Join(errs...)
}
