package etcd

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Register writes key=value attached to a lease of ttl (rounded up to whole
// seconds; etcd may raise very short TTLs to its minimum, about 2s) and
// keeps the lease alive. If the lease is lost (the store was unreachable
// for longer than ttl), the key is written again under a new lease as soon
// as the store answers. Release, the end of ctx or Close revoke the lease,
// which deletes the key.
func (s *Store) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	return s.RegisterIf(ctx, key, value, ttl, nil)
}

// RegisterIf is Register that takes an existing key over only when
// mayTakeOver allows it, in one transaction with the check (see
// store.Store). Revoking the lease deletes the key only while it is still
// attached to this registration's lease, so a key taken over since stays.
func (s *Store) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	if err := store.CheckRegistration(key, ttl); err != nil {
		return nil, store.Fail(ctx, "register", key, s.endpoint, store.ErrInvalid, err)
	}
	r := &registration{
		s:     s,
		key:   key,
		value: value,
		ttl:   int64(math.Ceil(ttl.Seconds())),
		may:   mayTakeOver,
	}
	var refused *refusal
	err := s.do(ctx, "register", key, func(ctx context.Context, cli *clientv3.Client) error {
		id, err := r.write(ctx, cli)
		if errors.As(err, &refused) {
			return nil
		}
		r.lease = id
		return err
	})
	if refused != nil {
		return nil, store.Fail(ctx, "register", key, s.endpoint, store.ErrConflict, refused.why)
	}
	if err != nil {
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
	ttl   int64 // seconds
	may   store.TakeOver

	mu    sync.Mutex
	lease clientv3.LeaseID
}

// refusal is what mayTakeOver said about the key's current holder.
type refusal struct{ why error }

func (e *refusal) Error() string { return e.why.Error() }

// write grants a lease and puts the key under it, in a transaction that
// checks the key is as mayTakeOver saw it (or still absent).
func (r *registration) write(ctx context.Context, cli *clientv3.Client) (clientv3.LeaseID, error) {
	g, err := cli.Grant(ctx, r.ttl)
	if err != nil {
		return 0, fmt.Errorf("grant lease: %w", err)
	}
	revoke := func() {
		rctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
		cli.Revoke(rctx, g.ID)
		cancel()
	}
	full := r.s.full(r.key)
	for range 5 {
		cur, err := cli.Get(ctx, full)
		if err != nil {
			revoke()
			return 0, fmt.Errorf("read %s: %w", r.key, err)
		}
		cond := clientv3.Compare(clientv3.CreateRevision(full), "=", 0)
		if len(cur.Kvs) > 0 {
			kv := cur.Kvs[0]
			if kv.Lease == int64(r.leaseID()) && r.leaseID() != 0 {
				// Still ours (a keepalive hiccup): move it to the new lease.
			} else if r.may != nil {
				if why := r.may(kv.Value); why != nil {
					revoke()
					return 0, &refusal{why}
				}
			}
			cond = clientv3.Compare(clientv3.ModRevision(full), "=", kv.ModRevision)
		}
		resp, err := cli.Txn(ctx).If(cond).Then(clientv3.OpPut(full, string(r.value), clientv3.WithLease(g.ID))).Commit()
		if err != nil {
			revoke()
			return 0, fmt.Errorf("put under lease %x: %w", int64(g.ID), err)
		}
		if resp.Succeeded {
			return g.ID, nil
		}
	}
	revoke()
	return 0, fmt.Errorf("%s keeps changing", r.key)
}

func (r *registration) leaseID() clientv3.LeaseID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lease
}

// keep keeps the lease alive until ctx ends, and writes the key again
// under a new lease whenever the old one is lost.
func (r *registration) keep(ctx context.Context) {
	log := r.s.logger().With("register", r.key)
	var rt store.Backoff
	for {
		cli, err := r.s.client()
		if err != nil {
			break
		}
		started := time.Now()
		ka, err := cli.KeepAlive(ctx, r.leaseID())
		if err == nil {
			// The client closes ka when ctx ends, when the lease is gone
			// or when no keepalive answer came for a whole TTL.
			for range ka {
			}
			err = errors.New("lease expired or revoked, or no keepalive answer for a whole TTL")
		}
		if ctx.Err() != nil {
			break
		}
		log.Warn("store registration lost its lease; writing the key again when the store answers", "err", err)
		if time.Since(started) > healthyRun {
			rt.Reset()
		}
		if !r.rewrite(ctx, cli, &rt) {
			break
		}
		log.Info("store registration written again")
	}
}

// lost revokes the lease when the registration ended without Release.
func (r *registration) lost() {
	ctx, cancel := context.WithTimeout(context.Background(), releaseTimeout)
	defer cancel()
	if err := r.revoke(ctx); err != nil {
		r.s.logger().Warn("store registration could not revoke its lease; the key goes when it expires", "register", r.key, "err", err)
	}
}

// rewrite grants a new lease and puts the key again, retrying until it
// works (true) or ctx ends (false).
func (r *registration) rewrite(ctx context.Context, cli *clientv3.Client, rt *store.Backoff) bool {
	var said string
	for rt.Wait(ctx) {
		wctx, cancel := store.WithTimeout(ctx)
		id, err := r.write(wctx, cli)
		cancel()
		var refused *refusal
		if errors.As(err, &refused) && refused.Error() != said {
			said = refused.Error()
			r.s.logger().Error("store registration: the key is held by another owner; leaving it to them and retrying", "register", r.key, "err", refused)
		}
		if err != nil {
			continue
		}
		r.mu.Lock()
		old := r.lease
		r.lease = id
		r.mu.Unlock()
		// The old lease may still exist if the server came back in time;
		// the key has moved to the new one, so revoking it deletes nothing.
		rctx, cancel := context.WithTimeout(ctx, releaseTimeout)
		cli.Revoke(rctx, old)
		cancel()
		return true
	}
	return false
}

// revoke ends the lease, deleting the key. A lease that already expired
// is not an error: its key is gone too.
func (r *registration) revoke(ctx context.Context) error {
	cli, err := r.s.clientForRelease()
	if err != nil {
		return err
	}
	_, err = cli.Revoke(ctx, r.leaseID())
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return err
	}
	return nil
}

// release revokes the lease (Release).
func (r *registration) release(ctx context.Context) error {
	if err := r.revoke(ctx); err != nil {
		return r.s.fail(ctx, "register", r.key, fmt.Errorf("release: %w", err))
	}
	return nil
}
