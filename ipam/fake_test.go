package ipam_test

import (
	"context"
	"errors"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// fakeStore is an in-memory store.Store for fast unit tests: one revision
// counter as versions (like etcd), atomic compare-and-swap and transactions
// under one lock, the same key checks and error kinds as the real backends.
// The same tests also run against the embedded bolt store and real servers.
type fakeStore struct {
	mu       sync.Mutex
	rev      int64
	kv       map[string]store.KV
	watchers map[*fakeWatcher]bool
	closed   bool
}

type fakeWatcher struct {
	dir  string
	mu   sync.Mutex
	q    []store.Event
	wake chan struct{}
}

func newFakeStore() *fakeStore {
	return &fakeStore{kv: map[string]store.KV{}, watchers: map[*fakeWatcher]bool{}}
}

const fakeEndpoint = "fake://memory"

func (s *fakeStore) check(ctx context.Context, op, key string) error {
	if err := ctx.Err(); err != nil {
		return store.Fail(ctx, op, key, fakeEndpoint, store.ErrTimeout, err)
	}
	if s.closed {
		return store.Fail(ctx, op, key, fakeEndpoint, store.ErrUnavailable, errors.New("store closed"))
	}
	if key != "" {
		if err := store.ValidKey(key); err != nil {
			return store.Fail(ctx, op, key, fakeEndpoint, store.ErrInvalid, err)
		}
	}
	return nil
}

func under(key, dir string) bool { return strings.HasPrefix(key, dir+"/") }

func (s *fakeStore) Get(ctx context.Context, key string) (store.KV, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "get", key); err != nil {
		return store.KV{}, err
	}
	kv, ok := s.kv[key]
	if !ok {
		return store.KV{}, store.Fail(ctx, "get", key, fakeEndpoint, store.ErrNotFound, nil)
	}
	return copyKV(kv), nil
}

func (s *fakeStore) List(ctx context.Context, dir string) ([]store.KV, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "list", dir); err != nil {
		return nil, err
	}
	return s.list(dir), nil
}

func (s *fakeStore) list(dir string) []store.KV {
	out := []store.KV{}
	for k, kv := range s.kv {
		if under(k, dir) {
			out = append(out, copyKV(kv))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

func (s *fakeStore) Put(ctx context.Context, key string, value []byte) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "put", key); err != nil {
		return 0, err
	}
	return s.write(key, value), nil
}

func (s *fakeStore) Delete(ctx context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "delete", key); err != nil {
		return err
	}
	s.remove(key)
	return nil
}

func (s *fakeStore) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "cas", key); err != nil {
		return 0, err
	}
	if s.kv[key].Version != version {
		return 0, store.Fail(ctx, "cas", key, fakeEndpoint, store.ErrConflict, nil)
	}
	return s.write(key, value), nil
}

func (s *fakeStore) Txn(ctx context.Context, ops ...store.Op) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "txn", ""); err != nil {
		return err
	}
	if err := store.CheckOps(ops); err != nil {
		return store.Fail(ctx, "txn", "", fakeEndpoint, store.ErrInvalid, err)
	}
	for _, op := range ops {
		cur, exists := s.kv[op.Key]
		ok := true
		switch op.Kind {
		case store.OpCreate:
			ok = !exists
		case store.OpUpdate, store.OpDelete:
			ok = exists && cur.Version == op.Version
		}
		if !ok {
			return store.Fail(ctx, "txn", op.Key, fakeEndpoint, store.ErrConflict, nil)
		}
	}
	for _, op := range ops {
		if op.Kind == store.OpDelete {
			s.remove(op.Key)
		} else {
			s.write(op.Key, op.Value)
		}
	}
	return nil
}

// write and remove change one key and tell the watchers; s.mu is held.
func (s *fakeStore) write(key string, value []byte) int64 {
	s.rev++
	kv := store.KV{Key: key, Value: append([]byte(nil), value...), Version: s.rev}
	s.kv[key] = kv
	s.notify(store.Event{Type: store.EventPut, KV: copyKV(kv)})
	return s.rev
}

func (s *fakeStore) remove(key string) {
	if _, ok := s.kv[key]; !ok {
		return
	}
	s.rev++
	delete(s.kv, key)
	s.notify(store.Event{Type: store.EventDelete, KV: store.KV{Key: key}})
}

func (s *fakeStore) notify(ev store.Event) {
	for w := range s.watchers {
		if under(ev.KV.Key, w.dir) {
			w.push(ev)
		}
	}
}

func (w *fakeWatcher) push(ev store.Event) {
	w.mu.Lock()
	w.q = append(w.q, ev)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (s *fakeStore) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(ctx, "watch", dir); err != nil {
		return nil, err
	}
	w := &fakeWatcher{dir: dir, wake: make(chan struct{}, 1)}
	w.q = []store.Event{{Type: store.EventReset, Snapshot: s.list(dir)}}
	w.wake <- struct{}{}
	s.watchers[w] = true
	ch := make(chan store.Event)
	go func() {
		defer close(ch)
		defer func() { s.mu.Lock(); delete(s.watchers, w); s.mu.Unlock() }()
		for {
			select {
			case <-ctx.Done():
				return
			case <-w.wake:
			}
			w.mu.Lock()
			q := w.q
			w.q = nil
			w.mu.Unlock()
			for _, ev := range q {
				select {
				case ch <- ev:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return ch, nil
}

type fakeRegistration struct {
	s   *fakeStore
	key string
}

func (s *fakeStore) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	if _, err := s.Put(ctx, key, value); err != nil {
		return nil, err
	}
	return &fakeRegistration{s: s, key: key}, nil
}

func (s *fakeStore) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	if kv, err := s.Get(ctx, key); err == nil && mayTakeOver != nil {
		if why := mayTakeOver(kv.Value); why != nil {
			return nil, why
		}
	}
	return s.Register(ctx, key, value, ttl)
}

func (r *fakeRegistration) Release(ctx context.Context) error { return r.s.Delete(ctx, r.key) }

func (s *fakeStore) Endpoint() string { return fakeEndpoint }

func (s *fakeStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}

func copyKV(kv store.KV) store.KV {
	kv.Value = append([]byte(nil), kv.Value...)
	return kv
}
