package ipam_test

import (
	"context"
	"testing"

	dipam "github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/ipam"
)

// TestPurgeHost: purging a host gone for good releases its addresses and
// its references on the pool and the gateway; what another host holds
// stays, and purging that host too leaves the address space empty.
func TestPurgeHost(t *testing.T) {
	ctx := context.Background()
	s := newFakeStore()
	a := ipam.New(s, ipam.Options{HostID: "192.0.2.1"})
	b := ipam.New(s, ipam.Options{HostID: "192.0.2.2"})
	var pool string
	for _, d := range []*ipam.Driver{a, b} {
		p, err := d.RequestPool(ctx, &dipam.RequestPoolRequest{AddressSpace: ipam.LocalSpace, Pool: "10.9.0.0/24"})
		if err != nil {
			t.Fatal(err)
		}
		pool = p.PoolID
		if _, err := d.RequestAddress(ctx, &dipam.RequestAddressRequest{PoolID: pool, Address: "10.9.0.1",
			Options: map[string]string{"RequestAddressType": "com.docker.network.gateway"}}); err != nil {
			t.Fatal(err)
		}
	}
	ra, err := a.RequestAddress(ctx, &dipam.RequestAddressRequest{PoolID: pool})
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.RequestAddress(ctx, &dipam.RequestAddressRequest{PoolID: pool})
	if err != nil {
		t.Fatal(err)
	}

	n, err := ipam.PurgeHost(ctx, s, "192.0.2.1", nil)
	if err != nil || n != 3 { // its address, its gateway reference, its pool reference
		t.Fatalf("purge 192.0.2.1: %d released, %v; want 3", n, err)
	}
	allocs, err := b.Allocations(ctx, pool)
	if err != nil {
		t.Fatalf("the pool went while the other host holds it: %v", err)
	}
	var got []string
	for _, al := range allocs {
		got = append(got, al.Address+" "+al.Kind)
		if al.Refs["192.0.2.1"] != 0 || (al.Kind == ipam.KindAddress && al.Host == "192.0.2.1") {
			t.Errorf("the purged host still holds %+v", al)
		}
	}
	if len(allocs) != 2 {
		t.Errorf("allocations after the purge: %v; want the gateway and %s", got, rb.Address)
	}
	for _, al := range allocs {
		if al.Address == ra.Address[:len(ra.Address)-3] {
			t.Errorf("the purged host's address %s is still allocated", ra.Address)
		}
	}
	if _, err := ipam.PurgeHost(ctx, s, "192.0.2.2", nil); err != nil {
		t.Fatal(err)
	}
	if kvs, _ := s.List(ctx, ipam.Dir); len(kvs) != 0 {
		var keys []string
		for _, kv := range kvs {
			keys = append(keys, kv.Key)
		}
		t.Fatalf("after purging both hosts the store still has %v", keys)
	}
}
