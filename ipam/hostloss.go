package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

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
	kvs, err := s.List(ctx, "ipam/addrs/"+LocalSpace)
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
	d := &Driver{s: s}
	cur, _, err := d.getAllocation(ctx, p, a)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return "", nil
		}
		return "", err
	}
	return cur.describe(), nil
}
