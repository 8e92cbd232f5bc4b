package ipam

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Kinds of allocation.
const (
	// KindAddress is an endpoint's address: exclusive to one holder.
	KindAddress = "address"
	// KindGateway is a subnet's gateway: one address shared by every host
	// that asks for it, with a reference per host.
	KindGateway = "gateway"
	// KindAux is an auxiliary address (--aux-address) when
	// Options.RequireMACAddress lets the driver recognise it: reserved,
	// never handed out, with a reference per host.
	KindAux = "aux"
)

// Allocation is the record of one allocated address: the value of its key.
type Allocation struct {
	Address  string         `json:"address"`
	Pool     string         `json:"pool"` // the pool it was requested from
	Kind     string         `json:"kind"`
	Host     string         `json:"host"`               // the host that allocated it
	Endpoint string         `json:"endpoint,omitempty"` // set by AttachEndpoint
	Refs     map[string]int `json:"refs,omitempty"`     // gateway and aux: references per host
	Time     time.Time      `json:"time"`
	// Epoch, in the global space: the subnet's epoch when the swarm
	// manager last requested the address (see the package documentation).
	Epoch int `json:"epoch,omitempty"`
}

// describe names the holder of an allocation, for error messages.
func (a Allocation) describe() string {
	switch a.Kind {
	case KindGateway:
		return fmt.Sprintf("the gateway of pool %s (held by %s)", a.Pool, refsString(a.Refs))
	case KindAux:
		return fmt.Sprintf("an auxiliary address of pool %s (reserved by %s)", a.Pool, refsString(a.Refs))
	}
	if a.Endpoint != "" {
		return fmt.Sprintf("endpoint %s on host %s", a.Endpoint, a.Host)
	}
	return fmt.Sprintf("host %s (since %s)", a.Host, a.Time.Format(time.RFC3339))
}

// How dynamic allocation searches: probe up to maxProbes candidates with
// create-if-absent, then list the allocations (at most maxLists times) and
// try listBatch of the first listFree free addresses, keeping the others
// as spares.
const (
	maxProbes    = 16
	jumpMax      = 64 // the farthest a collision moves a host's cursor
	listFree     = 256
	listBatch    = 8
	maxLists     = 5
	maxAttachTry = 10
)

func (d *Driver) requestAddress(ctx context.Context, req *ipam.RequestAddressRequest) (netip.Addr, int, error) {
	p, err := parsePoolID(req.PoolID)
	if err != nil {
		return netip.Addr{}, 0, err
	}
	kind := KindAddress
	for _, k := range sortedKeys(req.Options) {
		v := req.Options[k]
		switch {
		case k == optRequestAddressType:
			if v != gatewayType {
				return netip.Addr{}, 0, errorf(ErrInvalid, "unknown %s %q (this driver knows %s)", k, v, gatewayType)
			}
			kind = KindGateway
		case strings.HasPrefix(k, "com.docker."):
			// libnetwork's own options (the MAC address is read below).
		default:
			return netip.Addr{}, 0, errorf(ErrInvalid, "unknown address option %q", k)
		}
	}
	var want netip.Addr
	if req.Address != "" {
		if want, err = parseAddr(req.Address, p); err != nil {
			return netip.Addr{}, 0, err
		}
		what := "address"
		if kind == KindGateway {
			what = "gateway"
		}
		if err := p.checkAddr(want, what); err != nil {
			return netip.Addr{}, 0, err
		}
	}
	if err := d.checkPool(ctx, p); err != nil {
		return netip.Addr{}, 0, err
	}
	if p.Space == GlobalSpace && kind != KindGateway {
		rec, _, err := d.readSpace(ctx, p.Space)
		if err != nil {
			return netip.Addr{}, 0, err
		}
		if e := rec.Subnets[p.Subnet.String()]; e != nil {
			p.epoch = e.Epoch
		}
	}
	var a netip.Addr
	switch {
	case kind == KindGateway:
		a, err = d.requestGateway(ctx, p, want)
	case !want.IsValid():
		a, err = d.allocateNext(ctx, p)
	case d.mac && req.Options[optMACAddress] == "" && p.Space == LocalSpace:
		// Only libnetwork on a host marks endpoint addresses with a MAC.
		// The global space is the swarm manager's, which never does: its
		// explicit addresses (a container's --ip on an attachable network)
		// are exclusive too.
		a, err = d.reserveAux(ctx, p, want)
	default:
		a, err = d.reserveExact(ctx, p, want)
	}
	if err != nil {
		return netip.Addr{}, 0, err
	}
	d.log.Debug("address allocated", "pool", p.ID, "address", a, "kind", kind)
	return a, p.Subnet.Bits(), nil
}

// parseAddr reads an address as Docker sends it (without a mask, but a
// mask is accepted too).
func parseAddr(s string, p poolSpec) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		pfx, perr := netip.ParsePrefix(s)
		if perr != nil {
			return netip.Addr{}, errorf(ErrInvalid, "malformed address %q", s)
		}
		a = pfx.Addr()
	}
	if a.Zone() != "" {
		return netip.Addr{}, errorf(ErrInvalid, "address %q: zones are not supported", s)
	}
	if p.Subnet.Addr().Is4() {
		a = a.Unmap()
	}
	return a, nil
}

func (d *Driver) newAllocation(p poolSpec, a netip.Addr, kind string) Allocation {
	rec := Allocation{Address: a.String(), Pool: p.ID, Kind: kind, Host: d.host, Time: time.Now().UTC(), Epoch: p.epoch}
	if kind != KindAddress {
		rec.Refs = map[string]int{d.holder(p.Space): 1}
	}
	return rec
}

// getAllocation reads the record of a (store.ErrNotFound if free).
func (d *Driver) getAllocation(ctx context.Context, p poolSpec, a netip.Addr) (Allocation, int64, error) {
	return readAllocation(ctx, d.s, p, a)
}

// readAllocation reads the record of a in s (store.ErrNotFound if free).
func readAllocation(ctx context.Context, s store.Store, p poolSpec, a netip.Addr) (Allocation, int64, error) {
	kv, err := s.Get(ctx, p.addrKey(a))
	if err != nil {
		return Allocation{}, 0, fmt.Errorf("read allocation of %s in pool %s: %w", a, p.ID, err)
	}
	var rec Allocation
	if err := json.Unmarshal(kv.Value, &rec); err != nil {
		return Allocation{}, 0, fmt.Errorf("read allocation of %s in pool %s: corrupt record %s: %w", a, p.ID, kv.Key, err)
	}
	return rec, kv.Version, nil
}

// reserveExact allocates exactly a, or says who holds it.
func (d *Driver) reserveExact(ctx context.Context, p poolSpec, a netip.Addr) (netip.Addr, error) {
	for range retries {
		_, err := d.s.CompareAndSwap(ctx, p.addrKey(a), mustJSON(d.newAllocation(p, a, KindAddress)), 0)
		if err == nil {
			return a, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return netip.Addr{}, fmt.Errorf("allocate %s in pool %s: %w", a, p.ID, err)
		}
		cur, ver, err := d.getAllocation(ctx, p, a)
		if errors.Is(err, store.ErrNotFound) {
			continue // released meanwhile: try again
		}
		if err != nil {
			return netip.Addr{}, err
		}
		if p.Space == GlobalSpace && cur.Kind == KindAddress && cur.Epoch < p.epoch {
			// The swarm manager requests again what it allocated before
			// it restarted or another manager took over: it is its own.
			prev := cur.Host
			cur.Epoch, cur.Host = p.epoch, d.host
			_, err := d.s.CompareAndSwap(ctx, p.addrKey(a), mustJSON(cur), ver)
			if errors.Is(err, store.ErrConflict) {
				continue
			}
			if err != nil {
				return netip.Addr{}, fmt.Errorf("take over %s in pool %s: %w", a, p.ID, err)
			}
			d.log.Info("swarm manager requested its address again", "pool", p.ID, "address", a, "allocated_by", prev, "epoch", p.epoch)
			return a, nil
		}
		return netip.Addr{}, errorf(ErrInUse, "address %s is already in use by %s", a, cur.describe())
	}
	return netip.Addr{}, errorf(ErrBusy, "address %s of pool %s changed %d times while allocating it; try again", a, p.ID, retries)
}

// reserveAux reserves an auxiliary address, or adds this host's reference
// on it when another host reserved it already.
func (d *Driver) reserveAux(ctx context.Context, p poolSpec, a netip.Addr) (netip.Addr, error) {
	for range retries {
		_, err := d.s.CompareAndSwap(ctx, p.addrKey(a), mustJSON(d.newAllocation(p, a, KindAux)), 0)
		if err == nil {
			return a, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return netip.Addr{}, fmt.Errorf("reserve auxiliary address %s in pool %s: %w", a, p.ID, err)
		}
		ok, err := d.addSharedRef(ctx, p, a, KindAux)
		if err != nil {
			return netip.Addr{}, err
		}
		if ok {
			return a, nil
		}
	}
	return netip.Addr{}, errorf(ErrBusy, "address %s of pool %s changed %d times while reserving it; try again", a, p.ID, retries)
}

// addSharedRef adds this host's reference on the shared allocation of a.
// It reports false when a is not allocated (any more).
func (d *Driver) addSharedRef(ctx context.Context, p poolSpec, a netip.Addr, kind string) (bool, error) {
	for range retries {
		cur, ver, err := d.getAllocation(ctx, p, a)
		if errors.Is(err, store.ErrNotFound) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if cur.Kind != kind {
			return false, errorf(ErrInUse, "%s %s is already in use by %s", kindName(kind), a, cur.describe())
		}
		if cur.Refs == nil {
			cur.Refs = map[string]int{}
		}
		cur.Refs[d.holder(p.Space)]++
		_, err = d.s.CompareAndSwap(ctx, p.addrKey(a), mustJSON(cur), ver)
		if err == nil {
			return true, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return false, fmt.Errorf("add reference on %s %s: %w", kindName(kind), a, err)
		}
	}
	return false, errorf(ErrBusy, "address %s of pool %s changed %d times while adding a reference; try again", a, p.ID, retries)
}

func kindName(kind string) string {
	switch kind {
	case KindGateway:
		return "gateway"
	case KindAux:
		return "auxiliary address"
	}
	return "address"
}

// requestGateway returns the gateway of p's subnet, the same on every host:
// the one some host set already, else want, else the subnet's first address.
func (d *Driver) requestGateway(ctx context.Context, p poolSpec, want netip.Addr) (netip.Addr, error) {
	for range retries {
		rec, ver, err := d.readSpace(ctx, p.Space)
		if err != nil {
			return netip.Addr{}, err
		}
		if rec.pool(p) == nil {
			return netip.Addr{}, errorf(ErrUnknownPool, "unknown pool %s: no host has requested it (or all released it)", p.ID)
		}
		e := rec.Subnets[p.Subnet.String()]
		if e.Gateway != "" {
			g, err := netip.ParseAddr(e.Gateway)
			if err != nil {
				return netip.Addr{}, fmt.Errorf("address space %s: corrupt gateway %q of subnet %s", p.Space, e.Gateway, p.Subnet)
			}
			if want.IsValid() && want != g {
				return netip.Addr{}, errorf(ErrInUse, "subnet %s already has gateway %s (set by another host or network); it cannot also use %s", p.Subnet, g, want)
			}
			if p.Space == GlobalSpace {
				// Only the swarm manager uses the global space, once per
				// network: this is a second network on the subnet, or the
				// manager requesting again what it has (see the package
				// documentation).
				if !want.IsValid() {
					return netip.Addr{}, errorf(ErrInUse, "subnet %s already belongs to a swarm network (gateway %s): give each swarm network a subnet of its own", p.Subnet, g)
				}
				err := d.swarmRequestedAgain(ctx, p, rec, ver)
				if errors.Is(err, store.ErrConflict) {
					continue
				}
				if err != nil {
					return netip.Addr{}, err
				}
				return g, nil
			}
			ok, err := d.addSharedRef(ctx, p, g, KindGateway)
			if err != nil {
				return netip.Addr{}, err
			}
			if ok {
				return g, nil
			}
			continue // the last holder released it just now
		}
		g := want
		if !g.IsValid() {
			g = p.Subnet.Addr().Next()
		}
		e.Gateway = g.String()
		err = d.s.Txn(ctx,
			store.Update(spaceKey(p.Space), mustJSON(rec), ver),
			store.Create(p.addrKey(g), mustJSON(d.newAllocation(p, g, KindGateway))))
		if err == nil {
			return g, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return netip.Addr{}, fmt.Errorf("set gateway %s of pool %s: %w", g, p.ID, err)
		}
		// Either the space record changed or g is taken: look which.
		cur, aver, err := d.getAllocation(ctx, p, g)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return netip.Addr{}, err
		}
		if cur.Kind != KindGateway {
			return netip.Addr{}, errorf(ErrInUse, "gateway %s is already in use by %s", g, cur.describe())
		}
		// A gateway left over from an earlier life of this subnet (its
		// pool was released while hosts still held the gateway): adopt it.
		if cur.Refs == nil {
			cur.Refs = map[string]int{}
		}
		cur.Refs[d.holder(p.Space)]++
		err = d.s.Txn(ctx,
			store.Update(spaceKey(p.Space), mustJSON(rec), ver),
			store.Update(p.addrKey(g), mustJSON(cur), aver))
		if err == nil {
			d.log.Warn("adopted a gateway allocation left from an earlier pool on this subnet", "pool", p.ID, "gateway", g, "refs", cur.Refs)
			return g, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return netip.Addr{}, fmt.Errorf("set gateway %s of pool %s: %w", g, p.ID, err)
		}
	}
	return netip.Addr{}, errorf(ErrBusy, "subnet %s changed %d times while setting its gateway; try again", p.Subnet, retries)
}

// swarmRequestedAgain records that the swarm manager requested a global
// subnet's pool and gateway again: it drops the pool reference that
// request added and starts the subnet's next epoch. rec at version ver is
// the global space's record; store.ErrConflict means it changed meanwhile.
func (d *Driver) swarmRequestedAgain(ctx context.Context, p poolSpec, rec *spaceRecord, ver int64) error {
	e := rec.Subnets[p.Subnet.String()]
	e.Epoch++
	if pe := rec.pool(p); pe != nil && pe.Refs[swarmHolder] > 1 {
		pe.Refs[swarmHolder]--
	}
	err := d.s.Txn(ctx, store.Update(spaceKey(p.Space), mustJSON(rec), ver))
	if err != nil {
		if errors.Is(err, store.ErrConflict) {
			return err
		}
		return fmt.Errorf("pool %s: %w", p.ID, err)
	}
	d.log.Info("swarm manager requested its network again (restarted, or a new leader): its addresses are taken over", "pool", p.ID, "gateway", e.Gateway, "epoch", e.Epoch)
	return nil
}

// allocateNext hands out the next free address of p's range. It tries
// candidates with create-if-absent (each write also moves the pool's shared
// hint): first the free addresses its last listing found, else from this
// host's cursor. After a collision it jumps to the hint once, then random
// distances ahead; after maxProbes collisions it lists the allocations.
func (d *Driver) allocateNext(ctx context.Context, p poolSpec) (netip.Addr, error) {
	first, last, ok := p.bounds()
	if !ok {
		return netip.Addr{}, errorf(ErrExhausted, "pool %s exhausted: it has no usable address", p)
	}
	size := span(first, last)
	for collisions := uint64(0); collisions < min(maxProbes, size); {
		cand, spare := d.popSpare(p.ID)
		if !spare {
			var err error
			if cand, err = d.take(ctx, p, first, last); err != nil {
				return netip.Addr{}, err
			}
		}
		ok, err := d.tryCreate(ctx, p, cand, first, last)
		if err != nil {
			return netip.Addr{}, err
		}
		if ok {
			return cand, nil
		}
		collisions++
		switch {
		case spare:
			// Taken since the listing: try the next one.
		case collisions == 1:
			// Another host allocated here: skip to the latest hint.
			if h, found, err := d.readHint(ctx, p, first, last); err == nil && found && h != after(cand, first, last) {
				d.seek(p.ID, h)
			}
		default:
			// Hosts are racing for the same addresses: move a random
			// distance ahead, so each continues in a stretch of its own.
			d.seek(p.ID, forward(cand, 1+rand.Uint64N(min(size, jumpMax)), first, last))
		}
	}
	from, err := d.take(ctx, p, first, last)
	if err != nil {
		return netip.Addr{}, err
	}
	return d.allocateFromList(ctx, p, from, first, last, size)
}

// allocateFromList finds free addresses by listing the allocations. It
// tries a few of them and keeps the rest as spares for the next requests.
func (d *Driver) allocateFromList(ctx context.Context, p poolSpec, from, first, last netip.Addr, size uint64) (netip.Addr, error) {
	for range maxLists {
		kvs, err := d.s.List(ctx, p.addrDir())
		if err != nil {
			return netip.Addr{}, fmt.Errorf("list allocations of pool %s: %w", p.ID, err)
		}
		taken := make(map[netip.Addr]bool, len(kvs))
		for _, kv := range kvs {
			a, err := p.addrOfKey(kv.Key)
			if err == nil && a.Compare(first) >= 0 && a.Compare(last) <= 0 {
				taken[a] = true
			}
		}
		if uint64(len(taken)) >= size {
			return netip.Addr{}, errorf(ErrExhausted, "pool %s exhausted: all %d addresses are in use", p, size)
		}
		// Collect free addresses from where this host is, in random order:
		// other hosts look at the same ones.
		var free []netip.Addr
		a := from
		for steps := uint64(0); steps < size && len(free) < listFree; steps++ {
			if !taken[a] {
				free = append(free, a)
			}
			a = after(a, first, last)
		}
		rand.Shuffle(len(free), func(i, j int) { free[i], free[j] = free[j], free[i] })
		for i, f := range free[:min(listBatch, len(free))] {
			ok, err := d.tryCreate(ctx, p, f, first, last)
			if err != nil {
				return netip.Addr{}, err
			}
			if ok {
				d.setSpare(p.ID, free[i+1:])
				return f, nil
			}
		}
		from = a
	}
	return netip.Addr{}, errorf(ErrBusy, "pool %s: every free address this host found was taken by another host first; try again", p)
}

func (d *Driver) popSpare(id string) (netip.Addr, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	list := d.spare[id]
	if len(list) == 0 {
		return netip.Addr{}, false
	}
	d.spare[id] = list[1:]
	return list[0], true
}

func (d *Driver) setSpare(id string, list []netip.Addr) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.spare[id] = append([]netip.Addr(nil), list...)
}

// tryCreate allocates a if it is free and moves the pool's hint past it.
func (d *Driver) tryCreate(ctx context.Context, p poolSpec, a, first, last netip.Addr) (bool, error) {
	err := d.s.Txn(ctx,
		store.Create(p.addrKey(a), mustJSON(d.newAllocation(p, a, KindAddress))),
		store.Put(p.hintKey(), []byte(after(a, first, last).String())))
	if err == nil {
		return true, nil
	}
	if errors.Is(err, store.ErrConflict) {
		return false, nil
	}
	return false, fmt.Errorf("allocate %s in pool %s: %w", a, p.ID, err)
}

// take returns this host's next candidate of p and advances the cursor,
// so concurrent requests of one host try different addresses. The cursor
// starts at the pool's hint.
func (d *Driver) take(ctx context.Context, p poolSpec, first, last netip.Addr) (netip.Addr, error) {
	d.mu.Lock()
	_, ok := d.cursors[p.ID]
	d.mu.Unlock()
	if !ok {
		h, found, err := d.readHint(ctx, p, first, last)
		if err != nil {
			return netip.Addr{}, err
		}
		if !found {
			h = first
		}
		d.mu.Lock()
		if _, ok := d.cursors[p.ID]; !ok {
			d.cursors[p.ID] = h
		}
		d.mu.Unlock()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.cursors[p.ID]
	if c.Compare(first) < 0 || c.Compare(last) > 0 {
		c = first
	}
	d.cursors[p.ID] = after(c, first, last)
	return c, nil
}

func (d *Driver) seek(id string, a netip.Addr) {
	d.mu.Lock()
	d.cursors[id] = a
	d.mu.Unlock()
}

// readHint reads where the pool's next allocation should start.
func (d *Driver) readHint(ctx context.Context, p poolSpec, first, last netip.Addr) (netip.Addr, bool, error) {
	kv, err := d.s.Get(ctx, p.hintKey())
	if errors.Is(err, store.ErrNotFound) {
		return netip.Addr{}, false, nil
	}
	if err != nil {
		return netip.Addr{}, false, fmt.Errorf("read allocation hint of pool %s: %w", p.ID, err)
	}
	h, err := netip.ParseAddr(string(kv.Value))
	if err != nil || h.Compare(first) < 0 || h.Compare(last) > 0 {
		return netip.Addr{}, false, nil
	}
	return h, true, nil
}

// Release frees address in pool poolID (for a gateway or auxiliary
// address: drops this host's reference) and returns the record it had,
// including the endpoint AttachEndpoint set. An address that is not
// allocated is an error (ErrNotAllocated), so each is released once.
func (d *Driver) Release(ctx context.Context, poolID, address string) (Allocation, error) {
	p, err := parsePoolID(poolID)
	if err != nil {
		return Allocation{}, err
	}
	a, err := parseAddr(address, p)
	if err != nil {
		return Allocation{}, err
	}
	if !p.Subnet.Contains(a) {
		return Allocation{}, errorf(ErrInvalid, "address %s is not inside subnet %s of pool %s", a, p.Subnet, p.ID)
	}
	key := p.addrKey(a)
	for range retries {
		cur, ver, err := d.getAllocation(ctx, p, a)
		if errors.Is(err, store.ErrNotFound) {
			if err := d.checkPool(ctx, p); err != nil {
				return Allocation{}, err
			}
			return Allocation{}, errorf(ErrNotAllocated, "address %s is not allocated in pool %s (released already?)", a, p.ID)
		}
		if err != nil {
			return Allocation{}, err
		}
		switch cur.Kind {
		case KindGateway, KindAux:
			holder := d.holder(p.Space)
			if cur.Refs[holder] == 0 {
				return Allocation{}, errorf(ErrNotHeld, "%s %s of pool %s is not held by host %s (held by %s)", kindName(cur.Kind), a, p.ID, holder, refsString(cur.Refs))
			}
			cur.Refs[holder]--
			if cur.Refs[holder] == 0 {
				delete(cur.Refs, holder)
			}
			switch {
			case len(cur.Refs) > 0:
				_, err = d.s.CompareAndSwap(ctx, key, mustJSON(cur), ver)
			case cur.Kind == KindGateway:
				err = d.dropGateway(ctx, p, a, ver)
			default:
				err = d.s.Txn(ctx, store.Delete(key, ver))
			}
		default:
			if p.Space == LocalSpace && cur.Host != d.host {
				// Released after its host was lost, and allocated again
				// by another host since: not ours to free.
				return Allocation{}, errorf(ErrNotHeld, "address %s of pool %s is held by %s, not by host %s", a, p.ID, cur.describe(), d.host)
			}
			err = d.s.Txn(ctx, store.Delete(key, ver))
		}
		if err == nil {
			d.log.Debug("address released", "pool", p.ID, "address", a, "kind", cur.Kind, "endpoint", cur.Endpoint)
			return cur, nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return Allocation{}, fmt.Errorf("release %s of pool %s: %w", a, p.ID, err)
		}
	}
	return Allocation{}, errorf(ErrBusy, "address %s of pool %s changed %d times while releasing it; try again", a, p.ID, retries)
}

// dropGateway deletes the gateway allocation (at version ver) and clears
// the subnet's gateway in one transaction.
func (d *Driver) dropGateway(ctx context.Context, p poolSpec, g netip.Addr, ver int64) error {
	rec, sver, err := d.readSpace(ctx, p.Space)
	if err != nil {
		return err
	}
	ops := []store.Op{store.Delete(p.addrKey(g), ver)}
	if e := rec.Subnets[p.Subnet.String()]; e != nil && e.Gateway == g.String() {
		e.Gateway = ""
		ops = append(ops, store.Update(spaceKey(p.Space), mustJSON(rec), sver))
	}
	return d.s.Txn(ctx, ops...)
}

// AttachEndpoint records endpointID as the holder of address (allocated by
// RequestAddress in pool poolID) and applies the caller's extra operations
// in the same transaction, so an endpoint record and its address are
// written together or not at all. Extra operations must not touch the
// address's key. Release returns the endpoint id again.
func (d *Driver) AttachEndpoint(ctx context.Context, poolID, address, endpointID string, extra ...store.Op) error {
	p, err := parsePoolID(poolID)
	if err != nil {
		return err
	}
	a, err := parseAddr(address, p)
	if err != nil {
		return err
	}
	for range maxAttachTry {
		cur, ver, err := d.getAllocation(ctx, p, a)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(ErrNotAllocated, "attach endpoint %s: address %s is not allocated in pool %s", endpointID, a, p.ID)
		}
		if err != nil {
			return err
		}
		if cur.Kind != KindAddress {
			return errorf(ErrInUse, "attach endpoint %s: address %s is %s", endpointID, a, cur.describe())
		}
		if cur.Endpoint != "" && cur.Endpoint != endpointID {
			return errorf(ErrInUse, "attach endpoint %s: address %s already belongs to endpoint %s", endpointID, a, cur.Endpoint)
		}
		cur.Endpoint = endpointID
		ops := append([]store.Op{store.Update(p.addrKey(a), mustJSON(cur), ver)}, extra...)
		err = d.s.Txn(ctx, ops...)
		if err == nil {
			return nil
		}
		if !errors.Is(err, store.ErrConflict) {
			return fmt.Errorf("attach endpoint %s to %s: %w", endpointID, a, err)
		}
		if _, now, gerr := d.getAllocation(ctx, p, a); gerr == nil && now == ver {
			// The address did not change: one of the extra operations failed.
			return fmt.Errorf("attach endpoint %s to %s: %w", endpointID, a, err)
		}
	}
	return errorf(ErrBusy, "attach endpoint %s: address %s kept changing; try again", endpointID, a)
}

// Allocations lists every address allocated in the subnet of pool poolID
// (by any pool on that subnet), in address order.
func (d *Driver) Allocations(ctx context.Context, poolID string) ([]Allocation, error) {
	p, err := parsePoolID(poolID)
	if err != nil {
		return nil, err
	}
	kvs, err := d.s.List(ctx, p.addrDir())
	if err != nil {
		return nil, fmt.Errorf("list allocations of pool %s: %w", p.ID, err)
	}
	out := make([]Allocation, 0, len(kvs))
	for _, kv := range kvs {
		var rec Allocation
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			return nil, fmt.Errorf("list allocations of pool %s: corrupt record %s: %w", p.ID, kv.Key, err)
		}
		out = append(out, rec)
	}
	sort.Slice(out, func(i, j int) bool {
		a, _ := netip.ParseAddr(out[i].Address)
		b, _ := netip.ParseAddr(out[j].Address)
		return a.Less(b)
	})
	return out, nil
}

// after is the address following a in [first, last], wrapping around.
func after(a, first, last netip.Addr) netip.Addr {
	if a.Compare(last) >= 0 || a.Compare(first) < 0 {
		return first
	}
	return a.Next()
}

// forward is a+n, or first when that passes last.
func forward(a netip.Addr, n uint64, first, last netip.Addr) netip.Addr {
	b := a.As16()
	lo, carry := bits.Add64(binary.BigEndian.Uint64(b[8:]), n, 0)
	hi, over := bits.Add64(binary.BigEndian.Uint64(b[:8]), 0, carry)
	if over != 0 {
		return first
	}
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	r := netip.AddrFrom16(b)
	if a.Is4() {
		if !r.Is4In6() {
			return first
		}
		r = r.Unmap()
	}
	if r.Compare(last) > 0 {
		return first
	}
	return r
}

// lastAddr is the highest address of p.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// span is the number of addresses in [first, last], at most MaxUint64.
func span(first, last netip.Addr) uint64 {
	f, l := first.As16(), last.As16()
	lo, borrow := bits.Sub64(binary.BigEndian.Uint64(l[8:]), binary.BigEndian.Uint64(f[8:]), 0)
	hi, _ := bits.Sub64(binary.BigEndian.Uint64(l[:8]), binary.BigEndian.Uint64(f[:8]), borrow)
	if hi != 0 || lo == math.MaxUint64 {
		return math.MaxUint64
	}
	return lo + 1
}
