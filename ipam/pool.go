package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/store"
)

// poolSpec is a pool as its id names it.
type poolSpec struct {
	ID     string
	Space  string
	Subnet netip.Prefix
	Range  netip.Prefix // the ip-range; Subnet itself when none was given

	// epoch is the subnet's epoch in the global space (see the package
	// documentation), read for address requests there; not part of the id.
	epoch int
}

func makePool(space string, subnet, rng netip.Prefix) poolSpec {
	id := space + "/" + seg(subnet)
	if !rng.IsValid() || rng == subnet {
		rng = subnet
	} else {
		id += "/" + seg(rng)
	}
	return poolSpec{ID: id, Space: space, Subnet: subnet, Range: rng}
}

// parsePoolID reads an id made by makePool, such as
// dnp-local/10.20.0.0_24/10.20.0.128_25.
func parsePoolID(id string) (poolSpec, error) {
	bad := func() error {
		return errorf(ErrUnknownPool, "unknown pool %q: not a pool id of this driver (want space/subnet[/ip-range], e.g. %s/10.20.0.0_24)", id, LocalSpace)
	}
	parts := strings.Split(id, "/")
	if len(parts) < 2 || len(parts) > 3 || (parts[0] != LocalSpace && parts[0] != GlobalSpace) {
		return poolSpec{}, bad()
	}
	subnet, err := netip.ParsePrefix(strings.Replace(parts[1], "_", "/", 1))
	if err != nil {
		return poolSpec{}, bad()
	}
	rng := subnet
	if len(parts) == 3 {
		if rng, err = netip.ParsePrefix(strings.Replace(parts[2], "_", "/", 1)); err != nil {
			return poolSpec{}, bad()
		}
	}
	p := makePool(parts[0], subnet, rng)
	if p.ID != id || subnet.Masked() != subnet || rng.Masked() != rng || !subnet.Contains(rng.Addr()) || rng.Bits() < subnet.Bits() {
		return poolSpec{}, bad()
	}
	return p, nil
}

func (p poolSpec) String() string {
	if p.Range != p.Subnet {
		return fmt.Sprintf("%s (ip-range %s)", p.Subnet, p.Range)
	}
	return p.Subnet.String()
}

// bounds are the first and last address dynamic allocation hands out: the
// ip-range without the subnet's own address and IPv4 broadcast.
func (p poolSpec) bounds() (first, last netip.Addr, ok bool) {
	first, last = p.Range.Addr(), lastAddr(p.Range)
	if first == p.Subnet.Addr() {
		first = first.Next()
	}
	if p.Subnet.Addr().Is4() && last == lastAddr(p.Subnet) {
		last = last.Prev()
	}
	return first, last, first.IsValid() && last.IsValid() && first.Compare(last) <= 0
}

// checkAddr says why a may not be allocated in p's subnet, if it may not.
func (p poolSpec) checkAddr(a netip.Addr, what string) error {
	switch {
	case !p.Subnet.Contains(a):
		return errorf(ErrInvalid, "%s %s is not inside subnet %s of pool %s", what, a, p.Subnet, p.ID)
	case a == p.Subnet.Addr():
		return errorf(ErrInvalid, "%s %s is the network address of subnet %s", what, a, p.Subnet)
	case a.Is4() && a == lastAddr(p.Subnet):
		return errorf(ErrInvalid, "%s %s is the broadcast address of subnet %s", what, a, p.Subnet)
	}
	return nil
}

// spaceRecord is the value of ipam/spaces/<space>.
type spaceRecord struct {
	Subnets map[string]*subnetEntry `json:"subnets"` // by subnet (10.20.0.0/24)
}

type subnetEntry struct {
	Gateway string                `json:"gateway,omitempty"`
	Pools   map[string]*poolEntry `json:"pools"` // by pool id
	// Epoch counts the times a swarm manager requested this global
	// subnet's allocations again (see the package documentation).
	Epoch int `json:"epoch,omitempty"`
}

type poolEntry struct {
	Refs    map[string]int `json:"refs"` // host -> number of RequestPool calls not yet released
	Carved  bool           `json:"carved,omitempty"`
	Created time.Time      `json:"created"`
}

func (rec *spaceRecord) pool(p poolSpec) *poolEntry {
	if e := rec.Subnets[p.Subnet.String()]; e != nil {
		return e.Pools[p.ID]
	}
	return nil
}

func (d *Driver) readSpace(ctx context.Context, space string) (*spaceRecord, int64, error) {
	rec := &spaceRecord{Subnets: map[string]*subnetEntry{}}
	kv, err := d.s.Get(ctx, spaceKey(space))
	if errors.Is(err, store.ErrNotFound) {
		return rec, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("read address space %s: %w", space, err)
	}
	if err := json.Unmarshal(kv.Value, rec); err != nil {
		return nil, 0, fmt.Errorf("read address space %s: corrupt record %s: %w", space, kv.Key, err)
	}
	if rec.Subnets == nil {
		rec.Subnets = map[string]*subnetEntry{}
	}
	return rec, kv.Version, nil
}

// spaceOp is the transaction operation writing rec back over version.
func spaceOp(space string, rec *spaceRecord, version int64) (store.Op, bool) {
	key := spaceKey(space)
	if len(rec.Subnets) == 0 {
		if version == 0 {
			return store.Op{}, false
		}
		return store.Delete(key, version), true
	}
	val := mustJSON(rec)
	if version == 0 {
		return store.Create(key, val), true
	}
	return store.Update(key, val, version), true
}

// updateSpace applies fn to the current record of space and writes the
// result, with fn's extra operations, in one transaction; on a conflict it
// starts over from a fresh read.
func (d *Driver) updateSpace(ctx context.Context, space string, fn func(rec *spaceRecord) ([]store.Op, error)) error {
	for range retries {
		rec, ver, err := d.readSpace(ctx, space)
		if err != nil {
			return err
		}
		ops, err := fn(rec)
		if err != nil {
			return err
		}
		if op, ok := spaceOp(space, rec, ver); ok {
			ops = append([]store.Op{op}, ops...)
		}
		if len(ops) == 0 {
			return nil
		}
		err = d.s.Txn(ctx, ops...)
		if err == nil {
			return nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return fmt.Errorf("write address space %s: %w", space, err)
		}
	}
	return errorf(ErrBusy, "address space %s changed %d times while this host was updating it; try again", space, retries)
}

func (d *Driver) requestPool(ctx context.Context, req *ipam.RequestPoolRequest) (poolSpec, error) {
	space := req.AddressSpace
	if space != LocalSpace && space != GlobalSpace {
		return poolSpec{}, errorf(ErrInvalid, "unknown address space %q (this driver has %s and %s)", space, LocalSpace, GlobalSpace)
	}
	size := 0
	for _, k := range sortedKeys(req.Options) {
		v := req.Options[k]
		switch {
		case k == OptSubnetSize:
			n, err := strconv.Atoi(strings.TrimPrefix(v, "/"))
			if err != nil || n <= 0 {
				return poolSpec{}, errorf(ErrInvalid, "IPAM option %s=%q: want a prefix length such as 24", k, v)
			}
			size = n
		case strings.HasPrefix(k, "com.docker."), k == optRequestAddressType:
			// libnetwork's own options; nothing for this driver. (A swarm
			// manager passes its gateway request's options along with the
			// pool requests of a network's second and later subnets.)
		default:
			return poolSpec{}, errorf(ErrInvalid, "unknown IPAM option %q (this driver knows %s)", k, OptSubnetSize)
		}
	}
	if req.Pool == "" {
		if req.SubPool != "" {
			return poolSpec{}, errorf(ErrInvalid, "ip-range %s given without a subnet", req.SubPool)
		}
		return d.carvePool(ctx, space, req.V6, size)
	}
	if size != 0 {
		return poolSpec{}, errorf(ErrInvalid, "IPAM option %s applies only to networks without --subnet (got subnet %s)", OptSubnetSize, req.Pool)
	}
	subnet, err := parsePrefix(req.Pool, req.V6, "subnet")
	if err != nil {
		return poolSpec{}, err
	}
	rng := subnet
	if req.SubPool != "" {
		if rng, err = parsePrefix(req.SubPool, req.V6, "ip-range"); err != nil {
			return poolSpec{}, err
		}
		if !subnet.Contains(rng.Addr()) || rng.Bits() < subnet.Bits() {
			return poolSpec{}, errorf(ErrInvalid, "ip-range %s is not inside subnet %s", rng, subnet)
		}
	}
	p := makePool(space, subnet, rng)
	if _, _, ok := p.bounds(); !ok {
		return poolSpec{}, errorf(ErrInvalid, "ip-range %s has no usable address in subnet %s", rng, subnet)
	}
	var created bool
	err = d.updateSpace(ctx, space, func(rec *spaceRecord) ([]store.Op, error) {
		created = rec.pool(p) == nil
		return nil, d.addPoolRef(rec, p, false)
	})
	if err != nil {
		return poolSpec{}, err
	}
	d.setKnown(p.ID, true)
	d.log.Info("pool requested", "pool", p.ID, "created", created)
	return p, nil
}

// parsePrefix reads a subnet or ip-range of the requested family.
func parsePrefix(s string, v6 bool, what string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, errorf(ErrInvalid, "malformed %s %q: want CIDR notation such as 10.20.0.0/24 or fd00::/64", what, s)
	}
	p = p.Masked()
	if p.Addr().Is4In6() {
		return netip.Prefix{}, errorf(ErrInvalid, "%s %s: IPv4-mapped IPv6 prefixes are not supported", what, s)
	}
	if p.Addr().Is6() != v6 {
		return netip.Prefix{}, errorf(ErrInvalid, "%s %s is %s but the request is for %s", what, p, family(p.Addr().Is6()), family(v6))
	}
	if what == "subnet" && p.Bits() > p.Addr().BitLen()-2 {
		return netip.Prefix{}, errorf(ErrInvalid, "subnet %s is too small (at most /%d for %s)", p, p.Addr().BitLen()-2, family(v6))
	}
	return p, nil
}

func family(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// addPoolRef adds this host's reference on p to rec, creating the pool
// (and its subnet) if needed. A different subnet overlapping p's is an error.
func (d *Driver) addPoolRef(rec *spaceRecord, p poolSpec, carved bool) error {
	key := p.Subnet.String()
	e := rec.Subnets[key]
	if e == nil {
		for _, other := range sortedKeys(rec.Subnets) {
			o, err := netip.ParsePrefix(other)
			if err == nil && o.Overlaps(p.Subnet) {
				return errorf(ErrOverlap, "subnet %s overlaps subnet %s of pool %s in address space %s",
					p.Subnet, o, strings.Join(sortedKeys(rec.Subnets[other].Pools), ", "), p.Space)
			}
		}
		e = &subnetEntry{Pools: map[string]*poolEntry{}}
		rec.Subnets[key] = e
	}
	pe := e.Pools[p.ID]
	if pe == nil {
		pe = &poolEntry{Refs: map[string]int{}, Carved: carved, Created: time.Now().UTC()}
		e.Pools[p.ID] = pe
	}
	if pe.Refs == nil {
		pe.Refs = map[string]int{}
	}
	pe.Refs[d.holder(p.Space)]++
	return nil
}

// carvePool creates a pool on the first free subnet of the default pools.
func (d *Driver) carvePool(ctx context.Context, space string, v6 bool, size int) (poolSpec, error) {
	if size != 0 {
		bits := 32
		if v6 {
			bits = 128
		}
		if size > bits-2 {
			return poolSpec{}, errorf(ErrInvalid, "IPAM option %s=%d: at most %d for %s", OptSubnetSize, size, bits-2, family(v6))
		}
	}
	// The other address space's subnets are avoided too: a swarm network
	// (global space) and a plain network (local space) carved from the same
	// default range must not get the same subnet.
	other := GlobalSpace
	if space == GlobalSpace {
		other = LocalSpace
	}
	orec, _, err := d.readSpace(ctx, other)
	if err != nil {
		return poolSpec{}, err
	}
	var p poolSpec
	err = d.updateSpace(ctx, space, func(rec *spaceRecord) ([]store.Op, error) {
		subnet, err := d.carve(rec, orec, v6, size)
		if err != nil {
			return nil, err
		}
		p = makePool(space, subnet, subnet)
		return nil, d.addPoolRef(rec, p, true)
	})
	if err != nil {
		return poolSpec{}, err
	}
	d.setKnown(p.ID, true)
	d.log.Info("pool carved from the default range", "pool", p.ID)
	return p, nil
}

// maxCarveSteps bounds the search for a free subnet in one default pool.
const maxCarveSteps = 1 << 16

// carve picks the first subnet of the default pools that overlaps no
// subnet of the given space records.
func (d *Driver) carve(rec, other *spaceRecord, v6 bool, size int) (netip.Prefix, error) {
	var used []netip.Prefix
	for _, r := range []*spaceRecord{rec, other} {
		for s := range r.Subnets {
			if p, err := netip.ParsePrefix(s); err == nil {
				used = append(used, p)
			}
		}
	}
	var tried []string
	for _, dp := range d.pools {
		base := dp.Base.Masked()
		if !base.IsValid() || base.Addr().Is6() != v6 {
			continue
		}
		bits := dp.Size
		if size != 0 {
			bits = size
		}
		tried = append(tried, fmt.Sprintf("/%d in %s", bits, base))
		if bits < base.Bits() || bits > base.Addr().BitLen()-2 {
			continue
		}
		cand := netip.PrefixFrom(base.Addr(), bits)
		for range maxCarveSteps {
			if !overlapsAny(cand, used) {
				return cand, nil
			}
			next := lastAddr(cand).Next()
			if !next.IsValid() || !base.Contains(next) {
				break
			}
			cand = netip.PrefixFrom(next, bits)
		}
	}
	if len(tried) == 0 {
		return netip.Prefix{}, errorf(ErrNoDefaultPool, "no default %s range is configured to carve a pool from: give the network a --subnet", family(v6))
	}
	return netip.Prefix{}, errorf(ErrNoDefaultPool, "no free subnet left in the default pools (%s) of this driver: give the network a --subnet", strings.Join(tried, ", "))
}

func overlapsAny(p netip.Prefix, list []netip.Prefix) bool {
	for _, q := range list {
		if p.Overlaps(q) {
			return true
		}
	}
	return false
}

func (d *Driver) releasePool(ctx context.Context, id string) error {
	p, err := parsePoolID(id)
	if err != nil {
		return err
	}
	var mine int
	var poolGone, subnetGone bool
	holder := d.holder(p.Space)
	err = d.updateSpace(ctx, p.Space, func(rec *spaceRecord) ([]store.Op, error) {
		e := rec.Subnets[p.Subnet.String()]
		pe := rec.pool(p)
		if pe == nil {
			return nil, errorf(ErrUnknownPool, "unknown pool %s: no host holds it", id)
		}
		if pe.Refs[holder] == 0 {
			return nil, errorf(ErrNotHeld, "pool %s is not held by host %s (held by %s)", id, holder, refsString(pe.Refs))
		}
		pe.Refs[holder]--
		mine = pe.Refs[holder]
		if mine == 0 {
			delete(pe.Refs, holder)
		}
		poolGone, subnetGone = len(pe.Refs) == 0, false
		if poolGone {
			delete(e.Pools, p.ID)
			if len(e.Pools) == 0 {
				delete(rec.Subnets, p.Subnet.String())
				subnetGone = true
			}
		}
		return nil, nil
	})
	if err != nil {
		return err
	}
	if mine == 0 {
		d.setKnown(p.ID, false)
	}
	d.mu.Lock()
	if poolGone {
		delete(d.cursors, p.ID)
		delete(d.spare, p.ID)
	}
	d.mu.Unlock()
	d.log.Info("pool released", "pool", p.ID, "pool_removed", poolGone, "subnet_removed", subnetGone)
	if poolGone {
		// The hint is only a hint: a pool created again just now writes a
		// new one with its first allocation.
		if err := d.s.Delete(ctx, p.hintKey()); err != nil {
			d.log.Warn("could not delete the allocation hint of a removed pool", "pool", p.ID, "err", err)
		}
	}
	if subnetGone {
		// Nobody uses the subnet any more; what is still allocated in it
		// leaked (its holder never released it). It stays reserved, so a
		// later pool on this subnet cannot hand it out twice.
		left, err := d.s.List(ctx, p.addrDir())
		if err == nil && len(left) > 0 {
			names := make([]string, 0, 5)
			for _, kv := range left[:min(5, len(left))] {
				names = append(names, kv.Key)
			}
			d.log.Warn("last pool of a subnet released while addresses are still allocated in it (leaked)",
				"pool", p.ID, "count", len(left), "first", names)
		}
	}
	return nil
}

// checkPool says whether pool p exists. Pools this host holds a reference
// on are remembered: they cannot disappear before this host releases them.
func (d *Driver) checkPool(ctx context.Context, p poolSpec) error {
	d.mu.Lock()
	known := d.known[p.ID]
	d.mu.Unlock()
	if known {
		return nil
	}
	rec, _, err := d.readSpace(ctx, p.Space)
	if err != nil {
		return err
	}
	pe := rec.pool(p)
	if pe == nil {
		return errorf(ErrUnknownPool, "unknown pool %s: no host has requested it (or all released it)", p.ID)
	}
	if pe.Refs[d.holder(p.Space)] > 0 {
		d.setKnown(p.ID, true)
	}
	return nil
}

func (d *Driver) setKnown(id string, known bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if known {
		d.known[id] = true
	} else {
		delete(d.known, id)
	}
}

func refsString(refs map[string]int) string {
	if len(refs) == 0 {
		return "no host"
	}
	var parts []string
	for _, h := range sortedKeys(refs) {
		parts = append(parts, fmt.Sprintf("%s x%d", h, refs[h]))
	}
	return strings.Join(parts, ", ")
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("ipam: encode %T: %v", v, err)) // plain structs of strings, maps and times: cannot fail
	}
	return b
}
