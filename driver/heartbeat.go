package driver

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Liveness. The peer sync registers this host's live key (hosts/<host>)
// and keeps it; a registered host also rewrites its last-seen time
// (seen/<host>) every seenInterval and once more when it stops; it goes
// when a host stops with no Docker network left.

// seenInterval is how often a registered host writes its last-seen time
// (less with a short grace period before stale hosts are purged: seenEvery).
const seenInterval = 30 * time.Second

type seenRecord struct {
	Addr string `json:"addr"`
	Name string `json:"name"`
	Seen string `json:"seen"` // RFC 3339, UTC
}

// register keeps this host's live key, retrying while the store is away,
// and releases it when ctx ends (or, with Config.KeepLiveOnStop and
// endpoints still here, leaves it to lapse).
func (p *peerSync) register(ctx context.Context) {
	rec := hostRecord{Addr: p.host, ID: p.machineID, Name: hostname(), Started: time.Now().UTC().Format(time.RFC3339), Key: p.publicKey}
	for wait := 100 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		// The key lives until Release, not until ctx ends: a store deletes
		// a registration whose context ends.
		reg, err := p.st.RegisterIf(context.WithoutCancel(ctx), hostKey(p.host), encode(rec), p.liveTTL, mayTakeOver(rec))
		var conflict *IdentityConflict
		if errors.As(err, &conflict) {
			p.id.refuse(fmt.Errorf("the plugin refuses to work: %w", conflict))
			p.log.Error("this plugin refuses to work: another machine holds this host's advertise address", "err", conflict)
			return
		}
		if err == nil {
			p.id.setRegistered()
			p.kick()
			p.log.Info("host registered", "host", p.host, "machine_id", rec.ID, "ttl", p.liveTTL.String())
			p.heartbeat(ctx, rec)
			rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if p.keepLive {
				if n, err := p.local.endpointsHere(rctx); n > 0 || err != nil {
					p.local.setKeptLive()
					p.log.Info("stopping with endpoints on this host: its live key stays until it lapses, so a plugin back within the TTL loses nothing",
						"endpoints", n, "ttl", p.liveTTL.String(), "err", err)
					p.lastSeen(rctx, rec)
					return
				}
			}
			reg.Release(rctx)
			p.lastSeen(rctx, rec)
			return
		}
		p.log.Warn("cannot register host yet", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// heartbeat writes this host's last-seen time now and every seenEvery
// until ctx ends.
func (p *peerSync) heartbeat(ctx context.Context, rec hostRecord) {
	t := time.NewTicker(seenEvery(p.staleAfter))
	defer t.Stop()
	for {
		wctx, cancel := context.WithTimeout(ctx, store.DefaultTimeout)
		if err := p.writeSeen(wctx, rec); err != nil && ctx.Err() == nil {
			p.log.Debug("cannot write last-seen time", "host", p.host, "err", err)
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *peerSync) writeSeen(ctx context.Context, rec hostRecord) error {
	seen := seenRecord{Addr: rec.Addr, Name: rec.Name, Seen: time.Now().UTC().Format(time.RFC3339)}
	_, err := p.st.Put(ctx, seenKey(p.host), encode(seen))
	return err
}

// lastSeen records a clean stop: the last-seen time of a host that still
// has Docker networks, or no trace at all of one that has none.
func (p *peerSync) lastSeen(ctx context.Context, rec hostRecord) {
	nets, err := p.st.List(ctx, netmapOf(p.host))
	switch {
	case err != nil:
	case len(nets) == 0:
		err = p.st.Delete(ctx, seenKey(p.host))
	default:
		err = p.writeSeen(ctx, rec)
	}
	if err != nil {
		p.log.Debug("cannot record the last-seen time", "host", p.host, "err", err)
	}
}

// endpointsHere counts this host's endpoints: those the store records
// for it and those this process knows of.
func (d *Driver) endpointsHere(ctx context.Context) (int, error) {
	ids := map[string]bool{}
	d.mu.Lock()
	for id := range d.endpoints {
		ids[id] = true
	}
	d.mu.Unlock()
	kvs, err := d.cfg.Store.List(ctx, endpointsDir)
	for _, kv := range kvs {
		if rec, err := decodeKV[endpointRecord](kv); err == nil && rec.Host == d.host {
			ids[kv.Key[strings.LastIndex(kv.Key, "/")+1:]] = true
		}
	}
	return len(ids), err
}
