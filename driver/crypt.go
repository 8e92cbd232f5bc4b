package driver

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Encrypted overlays. Each host publishes its public key in its host
// record (hosts/<host>, Config.PublicKey); keySync hands every key it sees
// to the data plane, which derives the traffic keys of each pair of hosts
// from them and its own private key. The store never holds a usable key.

// EncryptingPlane is a DataPlane that can encrypt overlays.
type EncryptingPlane interface {
	// CheckEncryption reports whether this host can build encrypted
	// overlays, with a clear error if not.
	CheckEncryption() error
	// SetHostKeys adds or replaces the public keys of hosts.
	SetHostKeys(keys map[netip.Addr]string) error
	// ResumeEncryption starts at once, before the store is read, what the
	// encrypted overlays already on this host need (after a restart).
	ResumeEncryption() error
}

func (d *Driver) checkEncryption() error {
	e, ok := d.cfg.Plane.(EncryptingPlane)
	if !ok || d.cfg.PublicKey == "" {
		return errors.New("option encrypted: this plugin cannot encrypt (no host key; see its log at start)")
	}
	return e.CheckEncryption()
}

// keySync watches hosts/ and gives the data plane every host's public key.
type keySync struct {
	d    *Driver
	keys map[netip.Addr]string
}

func newKeySync(d *Driver) *keySync { return &keySync{d: d, keys: map[netip.Addr]string{}} }

func (k *keySync) run(ctx context.Context) {
	plane, ok := k.d.cfg.Plane.(EncryptingPlane)
	if !ok || k.d.cfg.PublicKey == "" {
		return
	}
	if err := plane.ResumeEncryption(); err != nil {
		k.d.log.Warn("resuming encrypted overlays' data path failed; retried when the store is read", "err", err)
	}
	events, err := k.d.cfg.Store.Watch(ctx, hostsDir)
	if err != nil {
		k.d.log.Error("cannot watch hosts' keys", "err", err)
		return
	}
	defer func() {
		for range events {
		}
	}()
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			if !k.apply(ev) && retry == nil {
				continue
			}
		case <-retry:
		}
		retry = nil
		if err := plane.SetHostKeys(k.keys); err != nil {
			k.d.log.Warn("giving hosts' keys to the data plane failed; retrying", "err", err)
			retry = time.After(time.Second)
		}
	}
}

// apply notes the keys in ev; it reports whether any changed. Keys of
// hosts that went away are kept: their traffic stops with their
// endpoints, and they come back with the same key.
func (k *keySync) apply(ev store.Event) bool {
	var kvs []store.KV
	switch ev.Type {
	case store.EventReset:
		kvs = ev.Snapshot
	case store.EventPut:
		kvs = []store.KV{ev.KV}
	}
	changed := false
	for _, kv := range kvs {
		rec, err := decodeKV[hostRecord](kv)
		if err != nil || rec.Key == "" {
			continue
		}
		addr, err := netip.ParseAddr(hostOfKey(hostsDir, kv.Key))
		if err != nil || addr.String() == k.d.host {
			continue
		}
		if k.keys[addr] != rec.Key {
			k.keys[addr] = rec.Key
			changed = true
		}
	}
	return changed
}
