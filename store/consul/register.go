package consul

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/dnplabs/docker-net-plugin/store"
)

const (
	// minSessionTTL is Consul's default session_ttl_min: servers refuse
	// sessions with a shorter TTL.
	minSessionTTL = 10 * time.Second
	// maxSessionTTL is the longest session TTL Consul accepts.
	maxSessionTTL = 24 * time.Hour
	// releaseTimeout bounds destroying a session when a registration ends
	// with its context or with Close.
	releaseTimeout = 2 * time.Second
)

// sessionTTL is the Consul session TTL for a registration of ttl. Consul
// invalidates a session up to twice its TTL after the last renewal, so the
// session gets half of ttl, but never less than Consul's minimum of 10s:
// a dead owner's key disappears within max(ttl, 20s).
func sessionTTL(ttl time.Duration) time.Duration {
	return min(max((ttl/2).Round(time.Second), minSessionTTL), maxSessionTTL)
}

// Register writes key=value held by a Consul session with a TTL (see
// sessionTTL) and Behavior "delete", and renews the session every third of
// its TTL. When the session dies, Consul deletes the key. A key held by
// another client's session is taken over, as a plain Put would (the other
// session ending then leaves it alone). If the session is lost (the store
// was unreachable for longer than its TTL), a new session writes the key
// again as soon as the store answers. Release, the end of ctx or Close
// destroy the session, which deletes the key.
func (s *Store) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	return s.RegisterIf(ctx, key, value, ttl, nil)
}

// RegisterIf is Register that takes an existing key over only when
// mayTakeOver allows it, in one transaction with the check (see
// store.Store). Destroying the session deletes the key only while this
// registration's session holds it, so a key taken over since stays.
func (s *Store) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	if err := store.CheckRegistration(key, ttl); err != nil {
		return nil, store.Fail(ctx, "register", key, s.endpoint, store.ErrInvalid, err)
	}
	if s.life.Closed() {
		return nil, s.fail(ctx, "register", key, store.ErrClosed)
	}
	r := &registration{
		s:     s,
		key:   key,
		value: value,
		ttl:   sessionTTL(ttl),
		may:   mayTakeOver,
	}
	if err := r.first(ctx); err != nil {
		return nil, err
	}
	reg, err := s.life.KeepAlive(ctx, r.keep, r.lost, r.release)
	if err != nil {
		return nil, s.fail(ctx, "register", key, err)
	}
	return reg, nil
}

type registration struct {
	s     *Store
	key   string
	value []byte
	ttl   time.Duration // of the Consul session
	may   store.TakeOver

	mu      sync.Mutex
	session string // ID of the session holding the key; "" when lost
}

// first writes the key for Register, bounded by the call's deadline.
func (r *registration) first(ctx context.Context) error {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	if err := r.write(ctx); err != nil {
		var refused *refusal
		if errors.As(err, &refused) {
			return store.Fail(ctx, "register", r.key, r.s.endpoint, store.ErrConflict, refused.why)
		}
		return r.s.fail(ctx, "register", r.key, err)
	}
	return nil
}

// refusal is what mayTakeOver said about the key's current holder.
type refusal struct{ why error }

func (e *refusal) Error() string { return e.why.Error() }

func (r *registration) sessionID() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.session
}

// write creates a session and makes it hold the key with the value. A key
// that exists is deleted and locked in one transaction that also checks it
// is still as mayTakeOver saw it, so a key still held by an older session
// (ours from before a restart, or another client's it may take over)
// passes to the new one, and no other key is ever overwritten.
func (r *registration) write(ctx context.Context) error {
	var id string
	err := r.s.do(ctx, func(c *api.Client) error {
		var err error
		id, _, err = c.Session().CreateNoChecks(&api.SessionEntry{
			Name:      "docker-net-plugin " + r.key,
			TTL:       r.ttl.String(),
			Behavior:  api.SessionBehaviorDelete,
			LockDelay: time.Millisecond, // Consul's default of 15s would delay taking the key back
		}, r.s.write(ctx))
		return err
	})
	if err != nil {
		return fmt.Errorf("create session: %w", err)
	}
	destroy := func() {
		dctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
		r.s.do(dctx, func(c *api.Client) error {
			_, err := c.Session().Destroy(id, r.s.write(dctx))
			return err
		})
		cancel()
	}
	full := r.s.full(r.key)
	for range 5 {
		var pair *api.KVPair
		err := r.s.do(ctx, func(c *api.Client) error {
			var err error
			pair, _, err = c.KV().Get(full, r.s.query(ctx))
			return err
		})
		if err != nil {
			destroy()
			return fmt.Errorf("read the key: %w", err)
		}
		var ops api.TxnOps
		if pair == nil {
			ops = api.TxnOps{
				{KV: &api.KVTxnOp{Verb: api.KVCheckNotExists, Key: full}},
				{KV: &api.KVTxnOp{Verb: api.KVLock, Key: full, Value: r.value, Session: id}},
			}
		} else {
			if r.may != nil {
				if why := r.may(pair.Value); why != nil {
					destroy()
					return &refusal{why}
				}
			}
			ops = api.TxnOps{
				{KV: &api.KVTxnOp{Verb: api.KVCheckIndex, Key: full, Index: pair.ModifyIndex}},
				{KV: &api.KVTxnOp{Verb: api.KVDelete, Key: full}},
				{KV: &api.KVTxnOp{Verb: api.KVLock, Key: full, Value: r.value, Session: id}},
			}
		}
		err = r.s.do(ctx, func(c *api.Client) error {
			_, err := c.Raw().Write("/v1/txn", ops, nil, r.s.write(ctx))
			return err
		})
		var se api.StatusError
		if errors.As(err, &se) && se.Code == http.StatusConflict && !denied(se.Body) {
			continue // the key changed since it was read
		}
		if err != nil {
			destroy()
			return fmt.Errorf("write the key under session %s: %w", id, err)
		}
		r.mu.Lock()
		r.session = id
		r.mu.Unlock()
		return nil
	}
	destroy()
	return fmt.Errorf("%s keeps changing", r.key)
}

// keep renews the session until ctx ends, and writes the key again under a
// new session whenever the old one is lost.
func (r *registration) keep(ctx context.Context) {
	log := r.s.logger().With("register", r.key)
	every := r.ttl / 3
	var rt store.Backoff
	failing := false
	for {
		t := time.NewTimer(every)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		for {
			err := r.renew(ctx, every)
			if err == nil {
				break
			}
			if ctx.Err() != nil {
				return
			}
			var refused *refusal
			switch {
			case errors.As(err, &refused):
				if !failing {
					log.Error("store registration: the key is held by another owner; leaving it to them and retrying", "err", err)
				}
			case !failing:
				log.Warn("store registration cannot renew its session; retrying", "err", err)
			}
			failing = true
			if !rt.Wait(ctx) {
				return
			}
		}
		if failing {
			log.Info("store registration renewed again")
			failing = false
		}
		rt.Reset()
	}
}

// renew renews the session, or, if Consul no longer knows it, writes the
// key again under a new one.
func (r *registration) renew(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, min(timeout, store.DefaultTimeout))
	defer cancel()
	if id := r.sessionID(); id != "" {
		var entry *api.SessionEntry
		err := r.s.do(ctx, func(c *api.Client) error {
			var err error
			entry, _, err = c.Session().Renew(id, r.s.write(ctx))
			return err
		})
		if err != nil {
			return fmt.Errorf("renew session %s: %w", id, err)
		}
		if entry != nil {
			return nil
		}
		// The session expired (the store was out of reach for longer than
		// its TTL) and Consul deleted the key with it.
		r.s.logger().Warn("store registration lost its session; writing the key again",
			"register", r.key, "session", id)
		r.mu.Lock()
		r.session = ""
		r.mu.Unlock()
	}
	return r.write(ctx)
}

// destroy ends the session, which deletes the key. Consul answers success
// for a session that no longer exists: its key is gone too.
func (r *registration) destroy(ctx context.Context) error {
	id := r.sessionID()
	if id == "" {
		return nil
	}
	return r.s.do(ctx, func(c *api.Client) error {
		_, err := c.Session().Destroy(id, r.s.write(ctx))
		return err
	})
}

// lost destroys the session when the registration ended without Release.
func (r *registration) lost() {
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	if err := r.destroy(ctx); err != nil {
		r.s.logger().Warn("store registration could not destroy its session; the key goes when it expires",
			"register", r.key, "err", err)
	}
}

// release destroys the session, deleting the key (Release).
func (r *registration) release(ctx context.Context) error {
	if err := r.destroy(ctx); err != nil {
		return r.s.fail(ctx, "register", r.key, fmt.Errorf("release: %w", err))
	}
	return nil
}
