// Package simhosts simulates remote Docker hosts for scale tests: their
// live keys and endpoint records are written into the store as remote
// plugins would write them (driver/records.go), and Kernel and Monitor
// show what a real host's plugin made of them in its overlay namespace.
//
//	f := &simhosts.Fleet{Store: st, Overlay: "blue", Subnet: subnet, Hosts: addrs, Offset: 4096}
//	f.RegisterHosts(ctx)
//	f.AddRange(ctx, 0, 10000) // endpoints 0..9999, spread over the hosts
//
// Only the records a plugin reads of another host are written: no claims
// (macs/, addrs/) and no IPAM allocations, so nothing but the driver's
// peer sync sees them.
package simhosts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/store"
)

// keyTag marks the simulated endpoints' record keys.
const keyTag = "sim-"

// Fleet is a set of simulated hosts and the endpoints they hold on one
// overlay. Endpoint i lives on Hosts[i % len(Hosts)].
type Fleet struct {
	Store   store.Store
	Overlay string       // the overlay's name (-o overlay=NAME)
	Subnet  netip.Prefix // the overlay's IPv4 subnet: every address is inside it
	Hosts   []netip.Addr // the simulated hosts' underlay addresses
	// Offset: endpoint i gets the address Subnet's first address plus
	// Offset plus i, above the addresses the real containers get.
	Offset int
}

// Endpoint is one simulated endpoint.
type Endpoint struct {
	Key  string // its record's key, endpoints/<overlay>/sim-<i>
	Host netip.Addr
	IP   netip.Addr
	MAC  net.HardwareAddr
}

// The records, as the driver writes them (driver/records.go).
type endpointRecord struct {
	Network string `json:"network"`
	Host    string `json:"host"`
	IPv4    string `json:"ipv4"`
	MAC     string `json:"mac"`
}

type hostRecord struct {
	Addr    string `json:"addr"`
	Name    string `json:"name"`
	Started string `json:"started"`
}

// Endpoint returns endpoint i. It panics if the address falls outside
// the subnet (a test's sizes are wrong).
func (f *Fleet) Endpoint(i int) Endpoint {
	base := f.Subnet.Masked().Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(f.Offset + i)
	ip := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	last := uint32(1)<<(32-f.Subnet.Bits()) - 1
	if !f.Subnet.Contains(ip) || v&last == last {
		panic(fmt.Sprintf("simhosts: endpoint %d (%s) is outside %s", i, ip, f.Subnet))
	}
	return Endpoint{
		Key:  driver.EndpointKey(f.Overlay, fmt.Sprintf("%s%07d", keyTag, i)),
		Host: f.Hosts[i%len(f.Hosts)],
		IP:   ip,
		MAC:  net.HardwareAddr{0x02, 0xbe, 0x00, byte(i >> 16), byte(i >> 8), byte(i)},
	}
}

// value is endpoint e's record.
func (f *Fleet) value(e Endpoint) []byte {
	return mustJSON(endpointRecord{Network: "sim", Host: e.Host.String(),
		IPv4: netip.PrefixFrom(e.IP, f.Subnet.Bits()).String(), MAC: e.MAC.String()})
}

// RegisterHosts writes every simulated host's live key (without a lease:
// they stay live until UnregisterHosts).
func (f *Fleet) RegisterHosts(ctx context.Context) error {
	started := time.Now().UTC().Format(time.RFC3339)
	var ops []store.Op
	for i, h := range f.Hosts {
		rec := hostRecord{Addr: h.String(), Name: fmt.Sprintf("sim-host-%d", i), Started: started}
		ops = append(ops, store.Put(driver.HostKey(h.String()), mustJSON(rec)))
	}
	if err := TxnBatches(ctx, f.Store, ops); err != nil {
		return fmt.Errorf("register simulated hosts: %w", err)
	}
	return nil
}

// UnregisterHosts deletes the simulated hosts' live keys.
func (f *Fleet) UnregisterHosts(ctx context.Context) error {
	for _, h := range f.Hosts {
		if err := f.Store.Delete(ctx, driver.HostKey(h.String())); err != nil && !errors.Is(err, store.ErrNotFound) {
			return fmt.Errorf("unregister simulated host %s: %w", h, err)
		}
	}
	return nil
}

// Add writes endpoint i's record.
func (f *Fleet) Add(ctx context.Context, i int) error {
	e := f.Endpoint(i)
	if _, err := f.Store.Put(ctx, e.Key, f.value(e)); err != nil {
		return fmt.Errorf("add simulated endpoint %d: %w", i, err)
	}
	return nil
}

// Remove deletes endpoint i's record.
func (f *Fleet) Remove(ctx context.Context, i int) error {
	if err := f.Store.Delete(ctx, f.Endpoint(i).Key); err != nil {
		return fmt.Errorf("remove simulated endpoint %d: %w", i, err)
	}
	return nil
}

// AddRange writes the records of endpoints from..to-1, in transactions of
// store.MaxTxnOps, four at a time.
func (f *Fleet) AddRange(ctx context.Context, from, to int) error {
	ops := make([]store.Op, 0, to-from)
	for i := from; i < to; i++ {
		e := f.Endpoint(i)
		ops = append(ops, store.Put(e.Key, f.value(e)))
	}
	if err := TxnBatches(ctx, f.Store, ops); err != nil {
		return fmt.Errorf("add simulated endpoints %d..%d: %w", from, to-1, err)
	}
	return nil
}

// RemoveAll deletes every simulated endpoint record of the overlay and
// returns how many there were.
func (f *Fleet) RemoveAll(ctx context.Context) (int, error) {
	kvs, err := f.Store.List(ctx, driver.OverlayEndpoints(f.Overlay))
	if err != nil {
		return 0, fmt.Errorf("list endpoints of %s: %w", f.Overlay, err)
	}
	var ops []store.Op
	for _, kv := range kvs {
		if IsSimulated(kv.Key) {
			ops = append(ops, store.Delete(kv.Key, kv.Version))
		}
	}
	if err := TxnBatches(ctx, f.Store, ops); err != nil {
		return 0, fmt.Errorf("remove simulated endpoints: %w", err)
	}
	return len(ops), nil
}

// IsSimulated says whether an endpoint record's key is a simulated one.
func IsSimulated(key string) bool {
	return strings.HasPrefix(key[strings.LastIndex(key, "/")+1:], keyTag)
}

// Records reads every endpoint record of the overlay, simulated or not:
// the host of each IPv4 address.
func (f *Fleet) Records(ctx context.Context) (map[netip.Addr]string, error) {
	kvs, err := f.Store.List(ctx, driver.OverlayEndpoints(f.Overlay))
	if err != nil {
		return nil, fmt.Errorf("list endpoints of %s: %w", f.Overlay, err)
	}
	out := make(map[netip.Addr]string, len(kvs))
	for _, kv := range kvs {
		var rec endpointRecord
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			return nil, fmt.Errorf("endpoint record %s: %w", kv.Key, err)
		}
		p, err := netip.ParsePrefix(rec.IPv4)
		if err != nil {
			return nil, fmt.Errorf("endpoint record %s: address %q: %w", kv.Key, rec.IPv4, err)
		}
		out[p.Addr()] = rec.Host
	}
	return out, nil
}

// Remote is what the kernel of the host at local should hold as permanent
// neighbour entries, by records (from Records): the address of every
// endpoint of another host. (Whether that host is live is not checked: the
// simulated hosts are, and so are a test's real ones.)
func Remote(records map[netip.Addr]string, local netip.Addr) map[netip.Addr]bool {
	out := make(map[netip.Addr]bool, len(records))
	for ip, host := range records {
		if host != local.String() {
			out[ip] = true
		}
	}
	return out
}

// TxnBatches applies ops in transactions of store.MaxTxnOps, four at a
// time, each within 30 s.
func TxnBatches(ctx context.Context, st store.Store, ops []store.Op) error {
	var batches [][]store.Op
	for len(ops) > 0 {
		n := min(len(ops), store.MaxTxnOps)
		batches = append(batches, ops[:n])
		ops = ops[n:]
	}
	work := make(chan []store.Op)
	errs := make([]error, 4)
	var wg sync.WaitGroup
	for w := range errs {
		wg.Go(func() {
			for b := range work {
				if errs[w] != nil {
					continue
				}
				tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				errs[w] = st.Txn(tctx, b...)
				cancel()
			}
		})
	}
	for _, b := range batches {
		work <- b
	}
	close(work)
	wg.Wait()
	return errors.Join(errs...)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only this package's plain structs get here
	}
	return b
}
