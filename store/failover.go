package store

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"time"
)

// ErrInterrupted matches (errors.Is) an ErrUnavailable failure that a store
// cluster's failover explains: the servers answer, but the leader is gone
// (no leader yet, a request forwarded to a dead leader timed out, a
// connection to a member that died was cut mid-request). Such a call may or
// may not have been applied. A store that no server answers at all fails
// with a plain ErrUnavailable instead.
var ErrInterrupted = errors.New("interrupted by a store failover")

// Interrupted marks a backend's error as ErrInterrupted; its text is
// unchanged.
func Interrupted(err error) error { return interrupted{err} }

type interrupted struct{ error }

func (e interrupted) Unwrap() error        { return e.error }
func (e interrupted) Is(target error) bool { return target == ErrInterrupted }

// FailoverWait bounds how long WithFailover retries a call whose attempts
// are interrupted: a leader election and the clients' switch to the new
// leader take a few seconds (etcd: about 1 s election timeout; ZooKeeper:
// a few ticks; Consul: 1-2 s with raft_multiplier 1, up to 5 times more
// with its default).
const FailoverWait = 10 * time.Second

// WithFailover returns s with its one-shot calls (Get, List, Put, Delete,
// CompareAndSwap, Txn) riding through a failover of the store cluster: an
// attempt that fails with ErrInterrupted is tried again, with backoff, for
// up to FailoverWait and within the call's deadline. A store no server
// answers still fails at once.
//
// A write whose interrupted attempt may have been applied cannot simply be
// repeated: a compare-and-swap or transaction that then fails with
// ErrConflict is checked against the store, and if every key holds what the
// call wrote (and every key it deleted is gone), the first attempt went
// through and the call succeeds. Without that, a write applied by a leader
// that died before it answered would be reported as failed, and the caller
// would leave behind what it wrote.
func WithFailover(s Store) Store { return &failover{Store: s} }

type failover struct{ Store }

// retry runs fn until it succeeds, fails with anything but ErrInterrupted,
// FailoverWait has passed since its first interrupted attempt, or ctx ends.
// It reports whether some attempt was interrupted.
func retry(ctx context.Context, fn func() error) (wasInterrupted bool, err error) {
	var b Backoff
	var first time.Time
	for {
		err = fn()
		if err == nil || !errors.Is(err, ErrInterrupted) {
			return wasInterrupted, err
		}
		if !wasInterrupted {
			wasInterrupted, first = true, time.Now()
		}
		if time.Since(first) > FailoverWait || !b.Wait(ctx) {
			return true, err
		}
	}
}

func (f *failover) Get(ctx context.Context, key string) (KV, error) {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	var kv KV
	_, err := retry(ctx, func() error {
		var err error
		kv, err = f.Store.Get(ctx, key)
		return err
	})
	return kv, err
}

func (f *failover) List(ctx context.Context, dir string) ([]KV, error) {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	var kvs []KV
	_, err := retry(ctx, func() error {
		var err error
		kvs, err = f.Store.List(ctx, dir)
		return err
	})
	return kvs, err
}

// Put and Delete are idempotent: repeating them is harmless.
func (f *failover) Put(ctx context.Context, key string, value []byte) (int64, error) {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	var v int64
	_, err := retry(ctx, func() error {
		var err error
		v, err = f.Store.Put(ctx, key, value)
		return err
	})
	return v, err
}

func (f *failover) Delete(ctx context.Context, key string) error {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	_, err := retry(ctx, func() error { return f.Store.Delete(ctx, key) })
	return err
}

func (f *failover) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	var v int64
	wasInterrupted, err := retry(ctx, func() error {
		var err error
		v, err = f.Store.CompareAndSwap(ctx, key, value, version)
		return err
	})
	if wasInterrupted && errors.Is(err, ErrConflict) {
		op := Update(key, value, version)
		if version == 0 {
			op = Create(key, value)
		}
		if kvs, ok := f.applied(ctx, []Op{op}); ok {
			return kvs[0].Version, nil
		}
	}
	return v, err
}

func (f *failover) Txn(ctx context.Context, ops ...Op) error {
	ctx, cancel := WithTimeout(ctx)
	defer cancel()
	wasInterrupted, err := retry(ctx, func() error { return f.Store.Txn(ctx, ops...) })
	if wasInterrupted && errors.Is(err, ErrConflict) {
		if _, ok := f.applied(ctx, ops); ok {
			return nil
		}
	}
	return err
}

// applied reports whether the store holds what ops wrote: every written
// key has the value written, every deleted key is gone. It returns the
// keys as read (zero KVs for deleted ones).
func (f *failover) applied(ctx context.Context, ops []Op) ([]KV, bool) {
	kvs := make([]KV, len(ops))
	for i, op := range ops {
		var kv KV
		_, err := retry(ctx, func() error {
			var err error
			kv, err = f.Store.Get(ctx, op.Key)
			return err
		})
		switch {
		case op.Kind == OpDelete:
			if !errors.Is(err, ErrNotFound) {
				return nil, false
			}
		case err != nil || !bytes.Equal(kv.Value, op.Value):
			return nil, false
		}
		kvs[i] = kv
	}
	slog.Info("store write interrupted by a failover had gone through", "store", f.Endpoint(), "key", ops[0].Key)
	return kvs, true
}
