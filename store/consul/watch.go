package consul

import (
	"context"
	"errors"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/dnplabs/docker-net-plugin/store"
)

// watchWait is how long one blocking query waits for a change. Consul adds
// up to 1/16 of it as jitter; the request itself is bounded a little later
// so that a server that vanished without closing the connection is noticed.
const watchWait = 30 * time.Second

// Watch streams the changes below dir. It runs blocking queries on the
// directory: the first answer is sent as an EventReset, each later answer is
// compared with the previous one (per key ModifyIndex) and the differences
// are sent as EventPut and EventDelete. After a failed query (server down,
// no leader) or when Consul's index goes backwards (restored snapshot, new
// cluster) it starts again from index 0 and sends a fresh EventReset. The
// channel closes when ctx ends or the store is closed.
func (s *Store) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, store.Fail(ctx, "watch", dir, s.endpoint, store.ErrInvalid, err)
	}
	return s.life.Watch(ctx, s.endpoint, dir, func(ctx context.Context, ch chan<- store.Event) { s.watch(ctx, dir, ch) })
}

func (s *Store) watch(ctx context.Context, dir string, ch chan<- store.Event) {
	log := s.logger().With("watch", dir)
	var (
		r       store.Backoff
		failing bool
		known   map[string]store.KV // nil: the next answer is sent as a reset
		index   uint64              // Consul index of the last answer
		peek    bool                // ask without blocking
	)
	for {
		wait := index
		if peek {
			wait = 0
		}
		now, last, err := s.poll(ctx, dir, wait)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !failing {
				log.Warn("store watch cannot read the directory; retrying", "err", err)
				failing = true
			}
			known, index, peek = nil, 0, false
			if !r.Wait(ctx) {
				return
			}
			continue
		}
		if failing {
			log.Info("store watch reads the directory again")
			failing = false
		}
		r.Reset()
		// A blocking query that ends without a new index timed out, or
		// Consul abandoned its state for a restored snapshot and answered
		// from the old one. Only a query without an index reads the new
		// state (whose index may be lower), so ask once without blocking.
		peek = last == index && !peek
		if last < index {
			// Consul's advice: an index that goes backwards means the data
			// was replaced; start over.
			log.Info("store watch saw the Consul index go backwards; reading the directory again",
				"was", index, "now", last)
			known, index, peek = nil, 0, false
			continue
		}
		if known == nil {
			if !store.Send(ctx, ch, store.Event{Type: store.EventReset, Snapshot: now}) {
				return
			}
		} else {
			for _, ev := range store.Diff(known, now) {
				if !store.Send(ctx, ch, ev) {
					return
				}
			}
		}
		known = store.ByKey(now)
		// An index of 0 would make the next query return at once, forever.
		index = max(last, 1)
	}
}

// poll runs one query on dir: a blocking one waiting for a change after
// index, or an immediate one when index is 0. It returns the directory's
// content and Consul's index for it.
func (s *Store) poll(ctx context.Context, dir string, index uint64) ([]store.KV, uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, watchWait+watchWait/16+store.DefaultTimeout)
	defer cancel()
	var pairs api.KVPairs
	var meta *api.QueryMeta
	err := s.do(ctx, func(c *api.Client) error {
		q := &api.QueryOptions{WaitIndex: index, WaitTime: watchWait}
		var err error
		pairs, meta, err = c.KV().List(s.full(dir)+"/", q.WithContext(ctx))
		return err
	})
	if err != nil {
		return nil, 0, s.fail(ctx, "watch", dir, err)
	}
	if meta == nil {
		return nil, 0, s.fail(ctx, "watch", dir, errors.New("consul answered without an index"))
	}
	return s.kvs(pairs), meta.LastIndex, nil
}
