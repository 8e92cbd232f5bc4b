package zk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/dnplabs/docker-net-plugin/store"
)

// registration is a key held by an ephemeral znode of a session of its
// own, whose timeout is the TTL: when the process dies or loses the server
// for longer than that, the server removes the znode. After every
// reconnection the loop checks the znode and writes it again if the
// session that owned it expired.
type registration struct {
	s    *Store
	key  string
	path string
	data []byte
	may  store.TakeOver
	sess *session
}

// Register writes key=value as an ephemeral znode; see store.Store.
func (s *Store) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	return s.RegisterIf(ctx, key, value, ttl, nil)
}

// RegisterIf is Register that takes an existing key over only when
// mayTakeOver allows it, in one multi with the check (see store.Store).
// Cleanup deletes the znode only while this registration's session owns it,
// so a key taken over since stays.
func (s *Store) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	if err := store.CheckRegistration(key, ttl); err != nil {
		return nil, s.fail(ctx, "register", key, err)
	}
	sess, err := s.dial(ttl, nil)
	if err != nil {
		return nil, s.fail(ctx, "register", key, err)
	}
	r := &registration{
		s:    s,
		key:  key,
		path: s.path(key),
		data: encode(value),
		may:  mayTakeOver,
		sess: sess,
	}

	opCtx, cancel := store.WithTimeout(ctx)
	defer cancel()
	err = sess.waitReady(opCtx, waitLimit(opCtx))
	if err == nil {
		err = call(opCtx, func() error { return r.ensure(opCtx) })
	}
	if err != nil {
		sess.close()
		var refused *refusal
		if errors.As(err, &refused) {
			return nil, store.Fail(opCtx, "register", key, s.endpoint, store.ErrConflict, refused.why)
		}
		return nil, s.fail(opCtx, "register", key, err)
	}

	reg, err := s.life.KeepAlive(ctx, r.keep, r.lost, r.cleanup)
	if err != nil {
		return nil, s.fail(ctx, "register", key, err)
	}
	return reg, nil
}

// lost deletes the key and closes the session when the registration ended
// without Release.
func (r *registration) lost() {
	ctx, cancel := context.WithTimeout(context.Background(), store.DefaultTimeout)
	defer cancel()
	if err := r.cleanup(ctx); err != nil {
		slog.Warn("zookeeper: registration could not delete its key; it goes when its session expires",
			"endpoint", r.s.endpoint, "key", r.key, "err", err)
	}
}

// keep re-writes the znode after every reconnection until ctx ends.
func (r *registration) keep(ctx context.Context) {
	checked := false // the znode was checked since the last state change
	backoff := minBackoff
	for {
		ready, _, changed := r.sess.status()
		var retry <-chan time.Time
		if !ready {
			checked = false
		} else if !checked {
			opCtx, cancel := context.WithTimeout(ctx, store.DefaultTimeout)
			err := call(opCtx, func() error { return r.ensure(opCtx) })
			cancel()
			if err == nil {
				checked = true
				backoff = minBackoff
			} else if ctx.Err() == nil {
				// A connection that just dropped fails once or
				// twice; only a lasting failure is worth a warning.
				level := slog.LevelDebug
				var refused *refusal
				switch {
				case errors.As(err, &refused):
					if backoff == minBackoff { // once per streak
						level = slog.LevelError
					}
				case backoff >= maxBackoff:
					level = slog.LevelWarn
				}
				slog.Log(ctx, level, "zookeeper: cannot write registered key, retrying",
					"endpoint", r.s.endpoint, "key", r.key, "err", err, "backoff", backoff)
				retry = time.After(backoff)
				backoff = min(2*backoff, maxBackoff)
			}
		}
		select {
		case <-changed:
			// Whatever happened (even a reconnection that is
			// already complete), look at the znode again.
			checked = false
		case <-retry:
		case <-ctx.Done():
			return
		}
	}
}

// refusal is what mayTakeOver said about the key's current holder.
type refusal struct{ why error }

func (e *refusal) Error() string { return e.why.Error() }

// ensure makes the znode exist, owned by the current session: a znode
// left by an expired session of ours (or by a previous run of this host
// whose session has not expired yet, or another owner's that mayTakeOver
// lets it take over) is replaced in one multi that checks its version, so
// that watchers never see the key missing in between.
func (r *registration) ensure(ctx context.Context) error {
	conn := r.sess.conn
	for range 5 {
		if err := ctx.Err(); err != nil {
			return err
		}
		exists, st, err := conn.Exists(r.path)
		if err != nil {
			return err
		}
		if exists {
			if st.EphemeralOwner == conn.SessionID() {
				return nil
			}
			if st.NumChildren > 0 {
				return fmt.Errorf("%w: %s has keys below it and can not be a registration", store.ErrInvalid, r.key)
			}
			if r.may != nil && isKey(st) {
				data, gst, err := conn.Get(r.path)
				if errors.Is(err, zk.ErrNoNode) {
					continue
				}
				if err != nil {
					return err
				}
				if value, ok := decode(data); ok {
					if why := r.may(value); why != nil {
						return &refusal{why}
					}
				}
				st = gst
			}
			_, err := conn.Multi(
				&zk.DeleteRequest{Path: r.path, Version: st.Version},
				&zk.CreateRequest{Path: r.path, Data: r.data, Acl: r.s.acl, Flags: zk.FlagEphemeral})
			if err == nil {
				return nil
			}
			if !errors.Is(err, zk.ErrNoNode) && !errors.Is(err, zk.ErrBadVersion) && !errors.Is(err, zk.ErrNodeExists) {
				return err
			}
			continue
		}
		_, err = conn.Create(r.path, r.data, zk.FlagEphemeral, r.s.acl)
		if errors.Is(err, zk.ErrNoNode) {
			if err := r.s.ensureParents(conn, r.path); err != nil {
				return err
			}
			continue
		}
		if errors.Is(err, zk.ErrNodeExists) {
			continue
		}
		return err
	}
	return fmt.Errorf("%s keeps changing", r.path)
}

// cleanup deletes the znode if this session still owns it and the server
// is reachable now, then closes the session (which removes the znode on
// the server anyway): Release.
func (r *registration) cleanup(ctx context.Context) error {
	defer r.sess.close()
	if ready, _, _ := r.sess.status(); !ready {
		return nil
	}
	err := call(ctx, func() error {
		conn := r.sess.conn
		exists, st, err := conn.Exists(r.path)
		if err != nil || !exists || st.EphemeralOwner != conn.SessionID() {
			return err
		}
		if err := conn.Delete(r.path, st.Version); err != nil && !errors.Is(err, zk.ErrNoNode) {
			return err
		}
		r.s.prune(conn, path.Dir(r.path))
		return nil
	})
	if err != nil {
		return r.s.fail(ctx, "release", r.key, err)
	}
	return nil
}
