package driver

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// peerSync keeps this host's kernel state following the store: for every
// overlay with a local endpoint, a bridge and tunnel, and one static
// forwarding and neighbour entry per endpoint on another live host. It
// registers this host's live key and watches endpoints/ and hosts/.
type peerSync struct {
	// What it needs of the driver around it (local.go): this host's
	// networks and endpoints and its share of the kernel.
	local localHost
	id    *identity // whether the live key is this machine's
	// From the driver's Config.
	st         store.Store
	plane      DataPlane
	host       string     // this host's underlay address, as records name it
	under      netip.Addr // the same, parsed
	log        *slog.Logger
	metrics    Metrics     // nil: none
	names      NameService // nil: no names across hosts
	machineID  string
	publicKey  string
	liveTTL    time.Duration
	keepLive   bool          // Config.KeepLiveOnStop
	staleAfter time.Duration // grace period before a gone host is purged

	kickc  chan struct{} // a full pass, soon
	nudgec chan struct{} // a pass, soon

	// Mirrors of the store, owned by run's goroutine.
	endpoints map[string]endpointRecord // by store key
	hosts     map[string]bool
	haveEPs   bool
	haveHosts bool

	// Host loss (hostloss.go): when hosts/ was last loaded whole, and
	// whether this host's orphaned endpoints should be looked at.
	hostsLoaded time.Time
	restoreDue  bool

	// claimsDone: the claims of this host's endpoints recorded by an
	// earlier version were made (claims.go).
	claimsDone bool
	// skipped are the records the last reconciliation skipped, by key,
	// with why: each is logged when it starts and stops being skipped.
	skipped map[string]RecordProblem
	// kept are the VNIs of this host's orphaned endpoints whose interface
	// is still there (hostloss.go): their overlays stay.
	kept map[uint32]bool

	// Deltas (delta.go): the next pass is a full reconciliation when full
	// is set or views is nil (none done yet); otherwise it programs the
	// overlays in dirtyViews from their views.
	full       bool
	views      map[string]*overlayView // by overlay name
	dirtyViews map[string]bool
	// nLocal and nRemote count the endpoint records in the mirror.
	nLocal, nRemote int
	// namesSeen: when the name service was last given the mirror.
	namesSeen time.Time
}

const (
	// debounce lets a burst of store events become one pass.
	debounce = 20 * time.Millisecond
	// resyncEvery is how often a full reconciliation runs anyway.
	resyncEvery = 10 * time.Minute
	// namesEvery is how often, at most, the name service is given the
	// whole mirror between full reconciliations: often enough that a new
	// container's name resolves everywhere well within a second, rarely
	// enough that 100,000 endpoints cost little.
	namesEvery = 250 * time.Millisecond
)

// localHost is what the peer sync's reconciliations need of the driver:
// this host's Docker networks and endpoints as this process knows them
// (the watch may lag behind its own writes), and the kernel as Join and
// Leave share it.
type localHost interface {
	// network is this host's Docker network id, from memory or the store.
	network(ctx context.Context, id string) (*localNetwork, error)
	// localEndpoints are the endpoints this process created and has not
	// deleted.
	localEndpoints() []*localEndpoint
	// localVNIs are the VNIs of the overlays of localEndpoints.
	localVNIs() map[uint32]bool
	// lockHost keeps other processes (doctor --fix) off this host's
	// overlays until the returned func is called.
	lockHost(ctx context.Context) (func(), error)
	// holdJoins keeps Joins from building overlays until the returned
	// func is called.
	holdJoins() func()
	ensureOverlay(ov Overlay) error
	removeOverlay(vni uint32) error
	// endpointsHere counts this host's endpoints, those the store records
	// and those this process knows of.
	endpointsHere(ctx context.Context) (int, error)
	// setKeptLive records that the plugin stopped leaving its live key to
	// lapse.
	setKeptLive()
	// restoreOrphan takes back one orphaned endpoint of this host, or
	// drops its record (hostloss.go).
	restoreOrphan(ctx context.Context, kv store.KV) (uint32, error)
}

func newPeerSync(d *Driver) *peerSync {
	return &peerSync{local: d, id: &d.id, st: d.cfg.Store, plane: d.cfg.Plane, host: d.host, under: d.cfg.HostAddr, log: d.log, metrics: d.cfg.Metrics,
		names: d.cfg.Names, machineID: d.cfg.MachineID, publicKey: d.cfg.PublicKey, liveTTL: d.cfg.LiveTTL, keepLive: d.cfg.KeepLiveOnStop, staleAfter: d.staleAfter(),
		kickc: make(chan struct{}, 1), nudgec: make(chan struct{}, 1), endpoints: map[string]endpointRecord{}, hosts: map[string]bool{},
		skipped: map[string]RecordProblem{}, dirtyViews: map[string]bool{}}
}

// restoreLater asks for another look at this host's orphaned endpoints
// (from run's goroutine only).
func (p *peerSync) restoreLater() {
	p.restoreDue = true
	time.AfterFunc(100*time.Millisecond, p.kick)
}

// kick asks for a full reconciliation soon.
func (p *peerSync) kick() {
	select {
	case p.kickc <- struct{}{}:
	default:
	}
}

// nudge asks for a pass soon: this process's endpoints changed (Join,
// DeleteEndpoint). It is full only if an overlay may come or go.
func (p *peerSync) nudge() {
	select {
	case p.nudgec <- struct{}{}:
	default:
	}
}

func (p *peerSync) run(ctx context.Context) {
	log := p.log
	registered := make(chan struct{})
	go func() { defer close(registered); p.register(ctx) }()
	defer func() { <-registered }()
	eps, err := p.st.Watch(ctx, endpointsDir)
	if err != nil {
		log.Error("cannot watch endpoints", "err", err)
		return
	}
	// Stop only once the watches have: they close their channels when
	// ctx ends, and until then may still be reading the store.
	defer func() {
		for range eps {
		}
	}()
	hosts, err := p.st.Watch(ctx, hostsDir)
	if err != nil {
		log.Error("cannot watch hosts", "err", err)
		return
	}
	defer func() {
		for range hosts {
		}
	}()
	purge := time.NewTicker(purgeEvery(p.staleAfter)) // stale.go
	defer purge.Stop()
	resync := time.NewTicker(resyncEvery)
	defer resync.Stop()
	var timer, names <-chan time.Time
	dirty := func() {
		if timer == nil {
			timer = time.After(debounce)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-eps:
			if !ok {
				return
			}
			p.applyEndpoint(ev)
			dirty()
		case ev, ok := <-hosts:
			if !ok {
				return
			}
			p.applyHost(ev)
			dirty()
		case <-p.kickc:
			p.full = true
			dirty()
		case <-p.nudgec:
			dirty()
		case <-resync.C:
			p.full = true
			dirty()
		case <-purge.C:
			if p.ready() {
				if err := p.purgeStale(ctx); err != nil {
					log.Warn("purging the records of hosts gone longer than the grace period failed; retrying later", "err", err)
				}
			}
		case <-names:
			names = nil
			if p.ready() {
				p.observeNames()
			}
		case <-timer:
			timer = nil
			if !p.ready() {
				continue
			}
			if p.full || p.views == nil || p.overlayMayGo() {
				p.fullPass(ctx)
				continue
			}
			changes, err := p.flush(ctx)
			if m := p.metrics; m != nil {
				m.Reconciled(changes, err)
				m.Known(p.known())
			}
			if err != nil {
				log.Warn("applying a change failed; reconciling in full", "err", err)
				dirty()
			}
			if wait := namesEvery - time.Since(p.namesSeen); wait <= 0 {
				p.observeNames()
			} else if names == nil {
				names = time.After(wait)
			}
		}
	}
}

// ready: both mirrors are loaded and the live key is this machine's (until
// then the records under this host's address may be another machine's).
func (p *peerSync) ready() bool {
	return p.haveEPs && p.haveHosts && p.id.ours()
}

// fullPass looks after this host's orphaned endpoints, the claims of
// endpoints an earlier version recorded and the endpoints of lost hosts,
// then reconciles the kernel in full.
func (p *peerSync) fullPass(ctx context.Context) {
	log := p.log
	p.full = false
	if p.restoreDue && p.hosts[p.host] {
		p.restoreDue = false
		if err := p.restoreOrphans(ctx); err != nil {
			log.Warn("restoring orphaned endpoints failed; retrying", "err", err)
			p.restoreDue = true
			time.AfterFunc(time.Second, p.kick)
		}
	}
	if !p.claimsDone && p.hosts[p.host] {
		if err := p.backfillClaims(ctx); err != nil {
			log.Warn("claiming the MACs and addresses of endpoints recorded by an earlier version failed; retrying", "err", err)
			time.AfterFunc(time.Second, p.kick)
		} else {
			p.claimsDone = true
		}
	}
	if err := p.collectLost(ctx); err != nil {
		log.Warn("releasing a lost host's endpoints failed; retrying", "err", err)
		time.AfterFunc(time.Second, p.kick)
	}
	p.observeNames()
	changes, err := p.reconcile(ctx)
	if m := p.metrics; m != nil {
		m.Reconciled(changes, err)
		m.Known(p.known())
	}
	if err != nil {
		log.Warn("reconcile failed; retrying", "err", err)
		time.AfterFunc(time.Second, p.kick)
	}
}

func (p *peerSync) applyEndpoint(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.endpoints = map[string]endpointRecord{}
		p.nLocal, p.nRemote = 0, 0
		for _, kv := range ev.Snapshot {
			if rec, ok := p.decodeEndpoint(kv); ok {
				p.setEndpoint(kv.Key, &rec)
			}
		}
		p.haveEPs = true
		p.restoreDue = true
		p.full = true
	case store.EventPut:
		rec, ok := p.decodeEndpoint(ev.KV)
		if !ok {
			p.deleteEndpoint(ev.KV.Key)
			return
		}
		var old *endpointRecord
		if o, ok := p.endpoints[ev.KV.Key]; ok {
			old = &o
		}
		p.noteEndpoint(ev.KV.Key, old, &rec)
		p.setEndpoint(ev.KV.Key, &rec)
	case store.EventDelete:
		p.deleteEndpoint(ev.KV.Key)
	}
}

func (p *peerSync) decodeEndpoint(kv store.KV) (endpointRecord, bool) {
	rec, err := decodeKV[endpointRecord](kv)
	if err != nil {
		p.log.Warn("skipping endpoint record", "err", err)
		return rec, false
	}
	return rec, true
}

func (p *peerSync) deleteEndpoint(key string) {
	old, ok := p.endpoints[key]
	if !ok {
		return
	}
	if old.Host == p.host {
		p.restoreDue = true // perhaps orphaned by another host
	}
	p.noteEndpoint(key, &old, nil)
	p.setEndpoint(key, nil)
}

// setEndpoint puts (rec nil: deletes) a record in the mirror.
func (p *peerSync) setEndpoint(key string, rec *endpointRecord) {
	if old, ok := p.endpoints[key]; ok {
		p.countEndpoint(old, -1)
		delete(p.endpoints, key)
	}
	if rec != nil {
		p.endpoints[key] = *rec
		p.countEndpoint(*rec, 1)
	}
}

func (p *peerSync) countEndpoint(rec endpointRecord, n int) {
	if rec.Host == p.host {
		p.nLocal += n
	} else {
		p.nRemote += n
	}
}

func (p *peerSync) applyHost(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.hosts = map[string]bool{}
		for _, kv := range ev.Snapshot {
			p.hosts[strings.TrimPrefix(kv.Key, hostsDir+"/")] = true
		}
		p.haveHosts = true
		p.hostsLoaded = time.Now()
		p.restoreDue = true
		p.full = true
	case store.EventPut:
		h := strings.TrimPrefix(ev.KV.Key, hostsDir+"/")
		if !p.hosts[h] {
			p.full = true // its endpoints are peers now
		}
		p.hosts[h] = true
		if h == p.host {
			p.restoreDue = true // registered (again)
			p.full = true
			p.checkOwnKey(ev.KV.Value)
		}
	case store.EventDelete:
		h := strings.TrimPrefix(ev.KV.Key, hostsDir+"/")
		if p.hosts[h] {
			p.full = true // its endpoints are peers no more
		}
		delete(p.hosts, h)
	}
}

// known counts the endpoints (here and elsewhere) and live hosts in the mirrors.
func (p *peerSync) known() (local, remote, hosts int) {
	return p.nLocal, p.nRemote, len(p.hosts)
}
