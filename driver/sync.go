package driver

import (
	"context"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// peerSync keeps this host's kernel state following the store: for every
// overlay with a local endpoint, a bridge and tunnel, and one static
// forwarding and neighbour entry per endpoint on another live host. It
// registers this host's live key and watches endpoints/ and hosts/.
type peerSync struct {
	d     *Driver
	kickc chan struct{}

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
}

// debounce lets a burst of store events become one reconciliation.
const debounce = 20 * time.Millisecond

func newPeerSync(d *Driver) *peerSync {
	return &peerSync{d: d, kickc: make(chan struct{}, 1), endpoints: map[string]endpointRecord{}, hosts: map[string]bool{},
		skipped: map[string]RecordProblem{}}
}

// restoreLater asks for another look at this host's orphaned endpoints
// (from run's goroutine only).
func (p *peerSync) restoreLater() {
	p.restoreDue = true
	time.AfterFunc(100*time.Millisecond, p.kick)
}

// kick asks for a reconciliation soon.
func (p *peerSync) kick() {
	select {
	case p.kickc <- struct{}{}:
	default:
	}
}

func (p *peerSync) run(ctx context.Context) {
	log := p.d.log
	registered := make(chan struct{})
	go func() { defer close(registered); p.register(ctx) }()
	defer func() { <-registered }()
	eps, err := p.d.cfg.Store.Watch(ctx, endpointsDir)
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
	hosts, err := p.d.cfg.Store.Watch(ctx, hostsDir)
	if err != nil {
		log.Error("cannot watch hosts", "err", err)
		return
	}
	defer func() {
		for range hosts {
		}
	}()
	purge := time.NewTicker(p.d.purgeEvery())
	defer purge.Stop()
	var timer <-chan time.Time
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
			dirty()
		case <-purge.C:
			if p.haveEPs && p.haveHosts && p.d.id.ours() {
				if err := p.purgeStale(ctx); err != nil {
					log.Warn("purging the records of hosts gone longer than the grace period failed; retrying later", "err", err)
				}
			}
		case <-timer:
			timer = nil
			// Only once the live key is this machine's: until then the
			// records under this host's address may be another machine's.
			if p.haveEPs && p.haveHosts && p.d.id.ours() {
				if p.restoreDue && p.hosts[p.d.host] {
					p.restoreDue = false
					if err := p.restoreOrphans(ctx); err != nil {
						log.Warn("restoring orphaned endpoints failed; retrying", "err", err)
						p.restoreDue = true
						time.AfterFunc(time.Second, p.kick)
					}
				}
				if !p.claimsDone && p.hosts[p.d.host] {
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
				if m := p.d.cfg.Metrics; m != nil {
					m.Reconciled(changes, err)
					m.Known(p.known())
				}
				if err != nil {
					log.Warn("reconcile failed; retrying", "err", err)
					time.AfterFunc(time.Second, p.kick)
				}
			}
		}
	}
}

func (p *peerSync) applyEndpoint(ev store.Event) {
	switch ev.Type {
	case store.EventReset:
		p.endpoints = map[string]endpointRecord{}
		for _, kv := range ev.Snapshot {
			p.putEndpoint(kv)
		}
		p.haveEPs = true
		p.restoreDue = true
	case store.EventPut:
		p.putEndpoint(ev.KV)
	case store.EventDelete:
		if p.endpoints[ev.KV.Key].Host == p.d.host {
			p.restoreDue = true // perhaps orphaned by another host
		}
		delete(p.endpoints, ev.KV.Key)
	}
}

func (p *peerSync) putEndpoint(kv store.KV) {
	rec, err := decodeKV[endpointRecord](kv)
	if err != nil {
		p.d.log.Warn("skipping endpoint record", "err", err)
		return
	}
	p.endpoints[kv.Key] = rec
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
	case store.EventPut:
		h := strings.TrimPrefix(ev.KV.Key, hostsDir+"/")
		p.hosts[h] = true
		if h == p.d.host {
			p.restoreDue = true // registered (again)
			p.checkOwnKey(ev.KV.Value)
		}
	case store.EventDelete:
		delete(p.hosts, strings.TrimPrefix(ev.KV.Key, hostsDir+"/"))
	}
}

// known counts the endpoints (here and elsewhere) and live hosts in the mirrors.
func (p *peerSync) known() (local, remote, hosts int) {
	for _, rec := range p.endpoints {
		if rec.Host == p.d.host {
			local++
		} else {
			remote++
		}
	}
	return local, remote, len(p.hosts)
}
