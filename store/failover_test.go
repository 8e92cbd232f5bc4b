package store

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// flaky is a tiny in-memory Store whose next calls fail as told: each
// entry of fails is the error of one call; a call marked applied makes its
// change before it fails (the leader wrote it and died before answering).
type flaky struct {
	Store // nil: only the methods below are used
	kv    map[string]KV
	rev   int64
	fails []failure
	calls int
}

type failure struct {
	err     error
	applied bool
}

var errLeaderGone = Interrupted(errors.New("etcdserver: request timed out"))

func (f *flaky) next() (failure, bool) {
	f.calls++
	if len(f.fails) == 0 {
		return failure{}, false
	}
	x := f.fails[0]
	f.fails = f.fails[1:]
	return x, true
}

func (f *flaky) Endpoint() string { return "flaky://test" }

func (f *flaky) Get(ctx context.Context, key string) (KV, error) {
	if x, ok := f.next(); ok && !x.applied {
		return KV{}, &Error{Op: "get", Key: key, Kind: ErrUnavailable, Cause: x.err}
	}
	kv, ok := f.kv[key]
	if !ok {
		return KV{}, &Error{Op: "get", Key: key, Kind: ErrNotFound}
	}
	return kv, nil
}

func (f *flaky) Delete(ctx context.Context, key string) error {
	x, failing := f.next()
	if !failing || x.applied {
		delete(f.kv, key)
	}
	if failing {
		return &Error{Op: "delete", Key: key, Kind: ErrUnavailable, Cause: x.err}
	}
	return nil
}

func (f *flaky) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	x, failing := f.next()
	if failing && !x.applied {
		return 0, &Error{Op: "cas", Key: key, Kind: ErrUnavailable, Cause: x.err}
	}
	if f.kv[key].Version != version {
		return 0, &Error{Op: "cas", Key: key, Kind: ErrConflict}
	}
	f.rev++
	f.kv[key] = KV{Key: key, Value: value, Version: f.rev}
	if failing {
		return 0, &Error{Op: "cas", Key: key, Kind: ErrUnavailable, Cause: x.err}
	}
	return f.rev, nil
}

func (f *flaky) Txn(ctx context.Context, ops ...Op) error {
	x, failing := f.next()
	if failing && !x.applied {
		return &Error{Op: "txn", Kind: ErrUnavailable, Cause: x.err}
	}
	for _, op := range ops {
		if (op.Kind == OpCreate && f.kv[op.Key].Version != 0) || ((op.Kind == OpUpdate || op.Kind == OpDelete) && f.kv[op.Key].Version != op.Version) {
			return &Error{Op: "txn", Key: op.Key, Kind: ErrConflict}
		}
	}
	for _, op := range ops {
		f.rev++
		if op.Kind == OpDelete {
			delete(f.kv, op.Key)
		} else {
			f.kv[op.Key] = KV{Key: op.Key, Value: op.Value, Version: f.rev}
		}
	}
	if failing {
		return &Error{Op: "txn", Kind: ErrUnavailable, Cause: x.err}
	}
	return nil
}

func newFlaky(fails ...failure) *flaky {
	return &flaky{kv: map[string]KV{}, fails: fails}
}

func TestFailoverRetriesInterruptedCalls(t *testing.T) {
	ctx := context.Background()

	// Not applied, then the new leader answers: the call succeeds.
	f := newFlaky(failure{err: errLeaderGone}, failure{err: errLeaderGone})
	s := WithFailover(f)
	if _, err := s.CompareAndSwap(ctx, "a", []byte("1"), 0); err != nil {
		t.Fatalf("cas across a failover: %v", err)
	}
	if f.calls != 3 || string(f.kv["a"].Value) != "1" {
		t.Fatalf("after 2 interrupted attempts: %d calls, a=%q; want 3 calls, a=1", f.calls, f.kv["a"].Value)
	}

	// Applied by the leader that died: the retry conflicts with our own
	// write, which the check finds, so the call succeeds with its version.
	f = newFlaky(failure{err: errLeaderGone, applied: true})
	s = WithFailover(f)
	v, err := s.CompareAndSwap(ctx, "b", []byte("mine"), 0)
	if err != nil {
		t.Fatalf("cas whose interrupted attempt was applied: %v", err)
	}
	if v != f.kv["b"].Version {
		t.Errorf("cas returned version %d, the key is at %d", v, f.kv["b"].Version)
	}
	f = newFlaky(failure{err: errLeaderGone, applied: true})
	s = WithFailover(f)
	ops := []Op{Create("c", []byte("x")), Create("d", []byte("y"))}
	if err := s.Txn(ctx, ops...); err != nil {
		t.Fatalf("txn whose interrupted attempt was applied: %v", err)
	}

	// A real conflict stays one: someone else holds the key.
	f = newFlaky(failure{err: errLeaderGone})
	f.kv["e"] = KV{Key: "e", Value: []byte("theirs"), Version: 7}
	s = WithFailover(f)
	if _, err := s.CompareAndSwap(ctx, "e", []byte("mine"), 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("cas on a key someone else holds, across a failover: %v, want a conflict", err)
	}
	// Without an interruption a conflict is not even checked.
	f = newFlaky()
	f.kv["e"] = KV{Key: "e", Value: []byte("mine"), Version: 7}
	s = WithFailover(f)
	if _, err := s.CompareAndSwap(ctx, "e", []byte("mine"), 0); !errors.Is(err, ErrConflict) || f.calls != 1 {
		t.Fatalf("plain conflict: %v after %d calls, want a conflict after 1", err, f.calls)
	}

	// Delete is repeated until it goes through.
	f = newFlaky(failure{err: errLeaderGone})
	f.kv["g"] = KV{Key: "g", Value: []byte("1"), Version: 1}
	if err := WithFailover(f).Delete(ctx, "g"); err != nil {
		t.Fatalf("delete across a failover: %v", err)
	}
	if _, ok := f.kv["g"]; ok {
		t.Error("the key is still there")
	}
}

func TestFailoverLeavesOtherFailuresAlone(t *testing.T) {
	// A store nobody answers fails at once: no retry.
	down := &Error{Op: "get", Kind: ErrUnavailable, Cause: errors.New("no connection to any server")}
	f := newFlaky(failure{err: down})
	if _, err := WithFailover(f).Get(context.Background(), "a"); !errors.Is(err, ErrUnavailable) || f.calls != 1 {
		t.Fatalf("store down: %v after %d calls, want ErrUnavailable after 1", err, f.calls)
	}
	// A failover that lasts past the call's deadline ends with it.
	var fails []failure
	for range 100 {
		fails = append(fails, failure{err: errLeaderGone})
	}
	f = newFlaky(fails...)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := WithFailover(f).Get(ctx, "a")
	if !errors.Is(err, ErrInterrupted) || time.Since(start) > 2*time.Second {
		t.Fatalf("endless failover: %v after %s, want ErrInterrupted by the deadline", err, time.Since(start))
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("an interrupted call is still ErrUnavailable: %v", err)
	}
	if !strings.Contains(err.Error(), "etcdserver: request timed out") {
		t.Errorf("the error lost the backend's text: %v", err)
	}
}
