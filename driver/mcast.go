package driver

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/docker/go-plugins-helpers/network"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Multicast. Each host's kernel learns which groups its containers joined
// (the overlay bridge snoops IGMP/MLD); this host publishes them per
// overlay under mcast/<overlay>/<host>, and programs every overlay it has
// so that a group goes only to the live hosts that published it. Groups
// nobody elsewhere wants stay on the host; link-local groups (and, where
// the kernel has no VXLAN MDB, every group some host wants) go to every
// host of the overlay, as broadcasts do.
//
// Memberships are read every mcastPoll (the kernel's MDB is polled, not
// watched), so a new receiver gets traffic from other hosts within about
// that time plus the store's propagation.

// mcastPoll is how often local memberships are read and the kernel's
// multicast forwarding checked.
const mcastPoll = time.Second

type groupsRecord struct {
	VNI    uint32   `json:"vni"`    // the overlay's, to tell when it is gone from the host
	Groups []string `json:"groups"` // sorted
}

// MulticastPlane is the part of a DataPlane that steers multicast; a
// DataPlane without it floods multicast (the driver then does nothing).
type MulticastPlane interface {
	// Groups returns the groups local endpoints of the overlay joined, as
	// the kernel learned them. An overlay not built here has none.
	Groups(vni uint32) ([]netip.Addr, error)
	// SetGroups makes the overlay send each group to exactly the remote
	// hosts listed for it; it returns how many kernel entries it changed.
	SetGroups(vni uint32, remote map[netip.Addr][]netip.Addr) (int, error)
}

// mcastSync publishes this host's memberships and programs the others'.
type mcastSync struct {
	d     *Driver
	plane MulticastPlane

	// Mirrors of the store, owned by run's goroutine.
	records   map[string]groupsRecord // by key
	hosts     map[string]bool
	haveRecs  bool
	haveHosts bool
	// published is what this host last wrote, by key (JSON; "": deleted),
	// until the watch echoes it.
	published map[string]string
}

func newMcastSync(d *Driver) *mcastSync {
	mp, _ := d.cfg.Plane.(MulticastPlane)
	return &mcastSync{d: d, plane: mp,
		records: map[string]groupsRecord{}, hosts: map[string]bool{}, published: map[string]string{}}
}

func (m *mcastSync) run(ctx context.Context) {
	if m.plane == nil {
		return
	}
	log := m.d.log
	recs, err := m.d.cfg.Store.Watch(ctx, mcastDir)
	if err != nil {
		log.Error("cannot watch multicast memberships", "err", err)
		return
	}
	defer func() {
		for range recs {
		}
	}()
	hosts, err := m.d.cfg.Store.Watch(ctx, hostsDir)
	if err != nil {
		log.Error("cannot watch hosts", "err", err)
		return
	}
	defer func() {
		for range hosts {
		}
	}()
	tick := time.NewTicker(mcastPoll)
	defer tick.Stop()
	var timer <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-recs:
			if !ok {
				return
			}
			m.applyRecord(ev)
		case ev, ok := <-hosts:
			if !ok {
				return
			}
			m.applyHost(ev)
		case <-tick.C:
			m.sync(ctx)
			continue
		case <-timer:
			timer = nil
			m.sync(ctx)
			continue
		}
		if timer == nil {
			timer = time.After(debounce)
		}
	}
}

func (m *mcastSync) applyRecord(ev store.Event) {
	put := func(kv store.KV) {
		var rec groupsRecord
		if err := json.Unmarshal(kv.Value, &rec); err != nil {
			m.d.log.Warn("skipping multicast record", "key", kv.Key, "err", err)
			return
		}
		m.records[kv.Key] = rec
	}
	switch ev.Type {
	case store.EventReset:
		m.records = map[string]groupsRecord{}
		for _, kv := range ev.Snapshot {
			put(kv)
		}
		m.haveRecs = true
		m.published = map[string]string{} // compare with the store afresh
	case store.EventPut:
		put(ev.KV)
		delete(m.published, ev.KV.Key) // the mirror has it now
	case store.EventDelete:
		delete(m.records, ev.KV.Key)
		delete(m.published, ev.KV.Key)
	}
}

func (m *mcastSync) applyHost(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		m.hosts = map[string]bool{}
		for _, kv := range ev.Snapshot {
			m.hosts[hostOfKey(hostsDir, kv.Key)] = true
		}
		m.haveHosts = true
	case store.EventPut:
		m.hosts[hostOfKey(hostsDir, ev.KV.Key)] = true
	case store.EventDelete:
		delete(m.hosts, hostOfKey(hostsDir, ev.KV.Key))
	}
}

// sync publishes the local memberships of every overlay on this host and
// programs the remote ones; it drops this host's records of overlays no
// longer built here.
func (m *mcastSync) sync(ctx context.Context) {
	if !m.haveRecs || !m.haveHosts {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	d := m.d
	present, err := d.cfg.Plane.Overlays()
	if err != nil {
		d.log.Warn("listing overlays failed; retrying", "err", err)
		return
	}
	for name, vni := range d.overlaysOn(present) {
		groups, err := m.plane.Groups(vni)
		if err != nil {
			d.log.Warn("reading multicast memberships failed; retrying", "overlay", name, "err", err)
			continue
		}
		m.publish(ctx, name, vni, slices.DeleteFunc(groups, solicitedNode))
		changes, err := m.plane.SetGroups(vni, m.remote(name))
		if err != nil {
			d.log.Warn("programming multicast groups failed; retrying", "overlay", name, "err", err)
		} else if changes > 0 {
			d.log.Debug("multicast groups programmed", "overlay", name, "changes", changes)
		}
	}
	// This host's records of overlays its kernel no longer has (those it
	// has but does not know yet, right after a restart, stay).
	for key, rec := range m.records {
		name, host, ok := splitMcastKey(key)
		if ok && host == d.host && !slices.Contains(present, rec.VNI) {
			m.publish(ctx, name, rec.VNI, nil)
		}
	}
}

// solicitedNode tells the groups (ff02::1:ffXX:XXXX) every IPv6 address
// joins for neighbour discovery. They are not shared: that would cost a
// store write per container; neighbour discovery of the overlay's own
// addresses is answered on each host, and the rest reaches every host as
// link-local traffic the bridges learned from the (flooded) reports.
func solicitedNode(g netip.Addr) bool {
	return solicitedNodes.Contains(g)
}

var solicitedNodes = netip.MustParsePrefix("ff02::1:ff00:0/104")

// publish writes this host's groups of an overlay (or deletes its record
// when there are none) unless the store has them already.
func (m *mcastSync) publish(ctx context.Context, overlay string, vni uint32, groups []netip.Addr) {
	rec := groupsRecord{VNI: vni}
	for _, g := range groups {
		rec.Groups = append(rec.Groups, g.String())
	}
	slices.Sort(rec.Groups)
	want := "" // deleted
	if len(rec.Groups) > 0 {
		want = string(encode(rec))
	}
	key := mcastKey(overlay, m.d.host)
	have, known := m.published[key]
	if !known {
		if cur, ok := m.records[key]; ok {
			have = string(encode(cur))
		}
	}
	if have == want {
		m.published[key] = want
		return
	}
	var err error
	if want == "" {
		err = m.d.cfg.Store.Delete(ctx, key)
	} else {
		_, err = m.d.cfg.Store.Put(ctx, key, []byte(want))
	}
	if err != nil {
		m.d.log.Warn("publishing multicast memberships failed; retrying", "overlay", overlay, "err", err)
		delete(m.published, key) // compare with the store again next time
		return
	}
	m.published[key] = want
	m.d.log.Debug("multicast memberships published", "overlay", overlay, "groups", rec.Groups)
}

// remote is, for each group, the other live hosts with members of it on
// the overlay.
func (m *mcastSync) remote(overlay string) map[netip.Addr][]netip.Addr {
	out := map[netip.Addr][]netip.Addr{}
	prefix := mcastKey(overlay, "")
	for key, rec := range m.records {
		host, ok := strings.CutPrefix(key, prefix)
		if !ok || host == m.d.host || strings.Contains(host, "/") || !m.hosts[host] {
			continue
		}
		addr, err := netip.ParseAddr(host)
		if err != nil {
			continue
		}
		for _, s := range rec.Groups {
			if g, err := netip.ParseAddr(s); err == nil && g.IsMulticast() {
				out[g] = append(out[g], addr)
			}
		}
	}
	return out
}

// overlaysOn are the overlays of this host's networks whose VNI is in
// present, by name.
func (d *Driver) overlaysOn(present []uint32) map[string]uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]uint32{}
	for _, n := range d.networks {
		if slices.Contains(present, n.Overlay.VNI) {
			out[n.Overlay.Name] = n.Overlay.VNI
		}
	}
	return out
}

// multicastRoute is the route Join gives a container with its first
// interface on an overlay of this plugin: 224.0.0.0/4 through that
// interface (type 1: connected, no next hop), so that multicast sent or
// joined without naming an interface uses the overlay and not the default
// route through docker_gwbridge. (IPv6 needs none: every IPv6 interface
// has its own ff00::/8 route in the local table.)
//
// A container gets it once: libnetwork adds the routes of each interface
// with NLM_F_EXCL, so a second identical route on another interface would
// fail that interface's join. A container on two overlays sends multicast
// through the first one it joined.
func multicastRoute() *network.StaticRoute {
	return &network.StaticRoute{Destination: "224.0.0.0/4", RouteType: routeConnected}
}

const routeConnected = 1 // libnetwork's types.CONNECTED

// takeMulticastRoute says whether endpoint ep, joining sandbox, gets the
// multicast route: unless another endpoint of this plugin holds it there
// already (as this process knows, or as the sandbox shows when this
// process can see it).
func (d *Driver) takeMulticastRoute(sandbox, ep string) bool {
	if sandbox == "" {
		return false
	}
	if sandboxHasMulticastRoute(sandbox) {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if holder, ok := d.mroutes[sandbox]; ok && holder != ep {
		return false
	}
	d.mroutes[sandbox] = ep
	return true
}

// dropMulticastRoute forgets that ep holds a sandbox's multicast route
// (its interface, and the route with it, leaves the sandbox).
func (d *Driver) dropMulticastRoute(ep string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for sandbox, holder := range d.mroutes {
		if holder == ep {
			delete(d.mroutes, sandbox)
		}
	}
}

// sandboxHasMulticastRoute reports whether the network namespace at path
// has a route for 224.0.0.0/4. It is false when the namespace cannot be
// seen from here (not created yet, or in another mount namespace).
func sandboxHasMulticastRoute(path string) bool {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return false
	}
	defer ns.Close()
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(ns), &st); err != nil || st.Type != unix.NSFS_MAGIC {
		return false // a file with no namespace mounted on it here
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return false
	}
	defer h.Close()
	_, dst, _ := net.ParseCIDR("224.0.0.0/4")
	routes, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: dst, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_DST|netlink.RT_FILTER_TABLE)
	return err == nil && len(routes) > 0
}
