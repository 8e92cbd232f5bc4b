package metrics

import (
	"context"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Store wraps s so that every operation records its latency and its errors,
// and every watch counts its reconnects. A nil *Metrics returns s itself.
func (m *Metrics) Store(s store.Store) store.Store {
	if m == nil {
		return s
	}
	return &instrumented{Store: s, m: m}
}

type instrumented struct {
	store.Store // Endpoint and Close pass through
	m           *Metrics
}

// observe records one operation that started at start and ended with err.
func (s *instrumented) observe(op string, start time.Time, err error) {
	s.m.storeSeconds.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil {
		s.m.storeErrors.WithLabelValues(op, errorKind(err)).Inc()
	}
}

func (s *instrumented) Get(ctx context.Context, key string) (store.KV, error) {
	start := time.Now()
	kv, err := s.Store.Get(ctx, key)
	s.observe("get", start, err)
	return kv, err
}

func (s *instrumented) List(ctx context.Context, dir string) ([]store.KV, error) {
	start := time.Now()
	kvs, err := s.Store.List(ctx, dir)
	s.observe("list", start, err)
	return kvs, err
}

func (s *instrumented) Put(ctx context.Context, key string, value []byte) (int64, error) {
	start := time.Now()
	v, err := s.Store.Put(ctx, key, value)
	s.observe("put", start, err)
	return v, err
}

func (s *instrumented) Delete(ctx context.Context, key string) error {
	start := time.Now()
	err := s.Store.Delete(ctx, key)
	s.observe("delete", start, err)
	return err
}

func (s *instrumented) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	start := time.Now()
	v, err := s.Store.CompareAndSwap(ctx, key, value, version)
	s.observe("cas", start, err)
	return v, err
}

func (s *instrumented) Txn(ctx context.Context, ops ...store.Op) error {
	start := time.Now()
	err := s.Store.Txn(ctx, ops...)
	s.observe("txn", start, err)
	return err
}

func (s *instrumented) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	start := time.Now()
	r, err := s.Store.Register(ctx, key, value, ttl)
	s.observe("register", start, err)
	return r, err
}

func (s *instrumented) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	start := time.Now()
	r, err := s.Store.RegisterIf(ctx, key, value, ttl, mayTakeOver)
	s.observe("register", start, err)
	return r, err
}

// Watch records the time to set the watch up, and counts every EventReset
// after the first one as a reconnect: the backend lost track of changes
// (store restart, compaction, session expiry) and read the directory again.
func (s *instrumented) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	start := time.Now()
	in, err := s.Store.Watch(ctx, dir)
	s.observe("watch", start, err)
	if err != nil {
		return nil, err
	}
	reconnects := s.m.reconnects.WithLabelValues(dir)
	out := make(chan store.Event)
	go func() {
		defer close(out)
		first := true
		for ev := range in {
			if ev.Type == store.EventReset {
				if !first {
					reconnects.Inc()
				}
				first = false
			}
			select {
			case out <- ev:
			case <-ctx.Done():
				for range in { // the backend closes it now that ctx is done
				}
				return
			}
		}
	}()
	return out, nil
}
