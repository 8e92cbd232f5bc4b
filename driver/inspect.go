package driver

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// What operators see: the cluster as the store records it (status), and
// what this host's kernel should hold (doctor).

// ClusterState is the cluster as the store records it.
type ClusterState struct {
	Hosts    []HostInfo    `json:"hosts"`
	Overlays []OverlayInfo `json:"overlays"`
	// Problems are endpoint records the hosts skip: malformed, or
	// claiming a MAC or address another endpoint of the overlay holds.
	Problems []RecordProblem `json:"problems"`
	// Orphans are endpoints of lost hosts, set aside until their host
	// comes back (or is purged), and endpoints that gave up an address
	// allocated again meanwhile.
	Orphans []OrphanInfo `json:"orphans"`
}

// RecordProblem is one endpoint record the peer sync skips.
type RecordProblem struct {
	Overlay  string `json:"overlay"`
	Endpoint string `json:"endpoint"`
	Host     string `json:"host"`
	IPv4     string `json:"ipv4,omitempty"`
	IPv6     string `json:"ipv6,omitempty"`
	MAC      string `json:"mac"`
	Kind     string `json:"kind"` // SkipInvalid or SkipConflict
	Reason   string `json:"reason"`
	// ConflictsWith is the endpoint that keeps the MAC or address this
	// record also claims, on ConflictHost; empty for a malformed record.
	ConflictsWith string `json:"conflicts_with,omitempty"`
	ConflictHost  string `json:"conflict_host,omitempty"`
}

// OrphanInfo is one orphaned endpoint.
type OrphanInfo struct {
	Host    string `json:"host"`
	Overlay string `json:"overlay"`
	ID      string `json:"id"`
	Network string `json:"network"`
	IPv4    string `json:"ipv4,omitempty"`
	MAC     string `json:"mac"`
	// Conflict: its address went to another container while its host was
	// lost; the endpoint is cut off until its container is re-created.
	Conflict      string    `json:"conflict,omitempty"`
	ConflictSince time.Time `json:"conflict_since,omitzero"`
}

// MarkStale sets, for every host without a live plugin, when its records
// are due to be purged (its last sign of life plus the grace period).
func (cs *ClusterState) MarkStale(after time.Duration, now time.Time) {
	for i := range cs.Hosts {
		h := &cs.Hosts[i]
		if h.Alive || h.LastSeen.IsZero() {
			continue
		}
		h.PurgeAt = h.LastSeen.Add(after)
		h.Stale = !now.Before(h.PurgeAt)
	}
}

// HostInfo is one host: live, or dead but still named by some record.
type HostInfo struct {
	Address string `json:"address"` // underlay (advertise) address
	Name    string `json:"name,omitempty"`
	Alive   bool   `json:"alive"` // its plugin holds its live key
	// MachineID is the identity of the machine whose plugin holds the
	// live key (identity.go).
	MachineID string `json:"machine_id,omitempty"`
	// Started is when its plugin registered (live hosts only).
	Started time.Time `json:"started,omitzero"`
	// LastSeen is when its plugin last wrote its heartbeat (every 30s
	// while alive, and when it stops); zero when unknown.
	LastSeen  time.Time `json:"last_seen,omitzero"`
	Networks  int       `json:"networks"`  // its Docker networks of this plugin
	Endpoints int       `json:"endpoints"` // its endpoints
	Orphans   int       `json:"orphans"`   // its orphaned endpoints
	// PurgeAt, for a host without a live plugin, is when its records are
	// due to be purged (MarkStale); Stale says that time has passed.
	PurgeAt time.Time `json:"purge_at,omitzero"`
	Stale   bool      `json:"stale,omitempty"`
}

// OverlayInfo is one overlay with its endpoints.
type OverlayInfo struct {
	Name     string   `json:"name"`
	VNI      uint32   `json:"vni"`
	Encap    string   `json:"encap"`
	Subnets  []string `json:"subnets"`
	Gateways []string `json:"gateways,omitempty"`
	// MTU is what the user set with -o mtu; 0 means each host derives it
	// from its underlay (minus 50 bytes for VXLAN over IPv4).
	MTU   int      `json:"mtu"`
	Hosts []string `json:"hosts"` // hosts with a Docker network on it
	// Missing says endpoints name this overlay but its record is gone.
	Missing   bool           `json:"missing,omitempty"`
	Endpoints []EndpointInfo `json:"endpoints"`
}

// EndpointInfo is one container interface.
type EndpointInfo struct {
	ID      string `json:"id"`
	Network string `json:"network"` // the Docker network id on its host
	Host    string `json:"host"`
	IPv4    string `json:"ipv4,omitempty"`
	IPv6    string `json:"ipv6,omitempty"`
	MAC     string `json:"mac"`
}

// ReadCluster reads the hosts, overlays and endpoints the store records.
// Records it cannot decode are skipped and named in the error, which comes
// with whatever could be read.
func ReadCluster(ctx context.Context, st store.Store) (*ClusterState, error) {
	lists := map[string][]store.KV{}
	for _, dir := range []string{hostsDir, seenDir, overlaysDir, netmapDir, endpointsDir, orphansDir} {
		kvs, err := st.List(ctx, dir)
		if err != nil {
			return nil, fmt.Errorf("read %s from the store: %w", dir, err)
		}
		lists[dir] = kvs
	}
	var errs []error
	hosts := map[string]*HostInfo{}
	host := func(addr string) *HostInfo {
		h := hosts[addr]
		if h == nil {
			h = &HostInfo{Address: addr}
			hosts[addr] = h
		}
		return h
	}
	for _, kv := range lists[hostsDir] {
		h := host(hostOfKey(hostsDir, kv.Key))
		h.Alive = true
		if rec, err := decodeKV[hostRecord](kv); err != nil {
			errs = append(errs, err)
		} else {
			h.Name = rec.Name
			h.MachineID = rec.ID
			h.Started, _ = time.Parse(time.RFC3339, rec.Started)
		}
	}
	for _, kv := range lists[netmapDir] {
		host(hostOfKey(netmapDir, kv.Key)).Networks++
	}

	overlays := map[string]*OverlayInfo{}
	knownOverlays := map[string]Overlay{}
	for _, kv := range lists[overlaysDir] {
		rec, err := decodeKV[overlayRecord](kv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		knownOverlays[rec.Name] = overlayOfRecord(rec)
		overlays[rec.Name] = &OverlayInfo{
			Name: rec.Name, VNI: rec.VNI, Encap: rec.Encap, Subnets: rec.Subnets,
			Gateways: slices.DeleteFunc(slices.Clone(rec.Gateways), func(g string) bool { return g == "" }),
			MTU:      rec.MTU, Hosts: rec.Hosts, Endpoints: []EndpointInfo{},
		}
		for _, h := range rec.Hosts {
			host(h)
		}
	}
	records := map[string]endpointRecord{}
	for _, kv := range lists[endpointsDir] {
		rec, err := decodeKV[endpointRecord](kv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		records[kv.Key] = rec
		name := overlayOfKey(kv.Key)
		ov := overlays[name]
		if ov == nil {
			ov = &OverlayInfo{Name: name, Missing: true}
			overlays[name] = ov
		}
		ov.Endpoints = append(ov.Endpoints, EndpointInfo{
			ID: idOfKey(kv.Key), Network: rec.Network, Host: rec.Host,
			IPv4: rec.IPv4, IPv6: rec.IPv6, MAC: rec.MAC,
		})
		host(rec.Host).Endpoints++
	}
	orphans := []OrphanInfo{}
	for _, kv := range lists[orphansDir] {
		o, err := decodeKV[orphanRecord](kv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		h := hostOfKey(orphansDir, kv.Key)
		since, _ := time.Parse(time.RFC3339, o.ConflictSince)
		orphans = append(orphans, OrphanInfo{Host: h, Overlay: o.Overlay, ID: o.ID, Network: o.Endpoint.Network,
			IPv4: o.Endpoint.IPv4, MAC: o.Endpoint.MAC, Conflict: o.Conflict, ConflictSince: since})
		host(h).Orphans++
	}
	// Heartbeats last: they add no host that nothing else names.
	for _, kv := range lists[seenDir] {
		h := hosts[hostOfKey(seenDir, kv.Key)]
		if h == nil {
			continue
		}
		rec, err := decodeKV[seenRecord](kv)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		h.LastSeen, _ = time.Parse(time.RFC3339, rec.Seen)
		if h.Name == "" {
			h.Name = rec.Name
		}
	}

	out := &ClusterState{Hosts: []HostInfo{}, Overlays: []OverlayInfo{}, Orphans: orphans,
		Problems: recordProblems(records, knownOverlays, func(h string) bool { return hosts[h] != nil && hosts[h].Alive })}
	if out.Problems == nil {
		out.Problems = []RecordProblem{}
	}
	for _, h := range hosts {
		out.Hosts = append(out.Hosts, *h)
	}
	sort.Slice(out.Hosts, func(i, j int) bool { return addrLess(out.Hosts[i].Address, out.Hosts[j].Address) })
	for _, ov := range overlays {
		sort.Slice(ov.Endpoints, func(i, j int) bool {
			a, b := ov.Endpoints[i], ov.Endpoints[j]
			if a.Host != b.Host {
				return addrLess(a.Host, b.Host)
			}
			if a.IPv4 != b.IPv4 {
				return addrLess(strings.Split(a.IPv4, "/")[0], strings.Split(b.IPv4, "/")[0])
			}
			return a.ID < b.ID
		})
		out.Overlays = append(out.Overlays, *ov)
	}
	sort.Slice(out.Overlays, func(i, j int) bool { return out.Overlays[i].Name < out.Overlays[j].Name })
	return out, errors.Join(errs...)
}

// addrLess orders addresses numerically, anything unparsable last by text.
func addrLess(a, b string) bool {
	x, errA := netip.ParseAddr(a)
	y, errB := netip.ParseAddr(b)
	switch {
	case errA == nil && errB == nil:
		return x.Less(y)
	case errA == nil:
		return true
	case errB == nil:
		return false
	}
	return a < b
}

// HostPlan is what one host's kernel should hold, by the store.
type HostPlan struct {
	Host     netip.Addr
	Overlays []PlannedOverlay // by VNI
	// LiveHosts are the hosts whose plugins hold their live key; endpoints
	// of other hosts are not programmed.
	LiveHosts []string
	// Skipped are the endpoint records of live hosts that the hosts skip
	// (malformed, or claiming a MAC or address another endpoint of the
	// overlay holds), on every overlay.
	Skipped []RecordProblem
	// Orphans are this host's endpoints orphaned while it was lost and not
	// restored: their interfaces and overlays stay until their containers
	// go.
	Orphans []OrphanedEndpoint
}

// PlannedOverlay is one overlay this host needs: it has a local endpoint.
type PlannedOverlay struct {
	Overlay              // as EnsureOverlay gets it (MTU 0: from the underlay)
	Networks  []string   // this host's Docker networks on it
	Endpoints []Endpoint // its endpoints on this host, by ID
	Peers     []Peer     // its endpoints on other live hosts, by MAC
}

// offline is a driver that is never started, with the store's endpoints
// and live hosts read once: what the plugin's peer sync would hold.
func offline(ctx context.Context, cfg Config) (*peerSync, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	p := New(cfg).peers
	for _, dir := range []string{endpointsDir, hostsDir} {
		kvs, err := cfg.Store.List(ctx, dir)
		if err != nil {
			return nil, fmt.Errorf("read %s from the store: %w", dir, err)
		}
		ev := store.Event{Type: store.EventReset, Snapshot: kvs}
		if dir == endpointsDir {
			p.applyEndpoint(ev)
		} else {
			p.applyHost(ev)
		}
	}
	return p, nil
}

// DesiredState computes from the store what the kernel of the host at
// addr should hold, with the same rules the running plugin applies. On an
// error the plan holds what could be computed.
func DesiredState(ctx context.Context, st store.Store, addr netip.Addr) (*HostPlan, error) {
	p, err := offline(ctx, Config{Store: st, HostAddr: addr})
	if err != nil {
		return nil, err
	}
	planned, err := p.plan(ctx)
	out := &HostPlan{Host: addr}
	for h := range p.hosts {
		out.LiveHosts = append(out.LiveHosts, h)
	}
	sort.Slice(out.LiveHosts, func(i, j int) bool { return addrLess(out.LiveHosts[i], out.LiveHosts[j]) })
	var errs []error
	known := map[string]Overlay{}
	for name, po := range planned {
		known[name] = overlayOf(po.net)
	}
	out.Skipped = recordProblems(p.endpoints, known, func(h string) bool { return p.hosts[h] || h == p.host })
	for _, po := range planned {
		pov := PlannedOverlay{Overlay: overlayOf(po.net), Networks: po.networks, Peers: po.peers}
		for _, ep := range po.endpoints {
			dep, err := dataEndpoint(ep)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			pov.Endpoints = append(pov.Endpoints, dep)
		}
		out.Overlays = append(out.Overlays, pov)
	}
	sort.Slice(out.Overlays, func(i, j int) bool { return out.Overlays[i].VNI < out.Overlays[j].VNI })
	orphans, oerr := p.orphaned(ctx)
	out.Orphans = orphans
	return out, errors.Join(append(errs, err, oerr)...)
}

// Reconcile runs once the reconciliation the plugin runs after every store
// change: it builds the overlays the host at addr needs, programs exactly
// their live peers and removes the overlays it does not need. It returns
// how many kernel changes it made.
func Reconcile(ctx context.Context, st store.Store, plane DataPlane, addr netip.Addr, log *slog.Logger) (int, error) {
	p, err := offline(ctx, Config{Store: st, Plane: plane, HostAddr: addr, Log: log})
	if err != nil {
		return 0, err
	}
	orphans, err := p.orphaned(ctx)
	if err != nil {
		return 0, err
	}
	p.kept = map[uint32]bool{}
	for _, o := range orphans {
		p.kept[o.VNI] = true
	}
	return p.reconcile(ctx)
}
