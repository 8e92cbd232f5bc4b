package etcd

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Watch streams the changes below dir. It first sends the directory's
// content (EventReset), then follows etcd's changes from the revision that
// content was read at. Whenever it loses that stream (compaction, lost
// connection, server restart) it reads the directory again, sends a new
// EventReset and follows on from there. The channel closes when ctx ends or
// the store is closed.
func (s *Store) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, store.Fail(ctx, "watch", dir, s.endpoint, store.ErrInvalid, err)
	}
	return s.life.Watch(ctx, s.endpoint, dir, func(ctx context.Context, ch chan<- store.Event) { s.watch(ctx, dir, ch) })
}

func (s *Store) watch(ctx context.Context, dir string, ch chan<- store.Event) {
	log := s.logger().With("watch", dir)
	var r store.Backoff
	failing := false
	for {
		snap, rev, err := s.snapshot(ctx, dir)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !failing {
				log.Warn("store watch cannot read the directory; retrying", "err", err)
				failing = true
			}
			if !r.Wait(ctx) {
				return
			}
			continue
		}
		if failing {
			log.Info("store watch reads the directory again")
			failing = false
		}
		if !store.Send(ctx, ch, store.Event{Type: store.EventReset, Snapshot: snap}) {
			return
		}
		started := time.Now()
		err = s.follow(ctx, dir, rev, ch)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > healthyRun {
			r.Reset()
		}
		log.Info("store watch interrupted; reading the directory again", "err", err)
		if !r.Wait(ctx) {
			return
		}
	}
}

// snapshot reads dir for a watch, bounded by the default timeout.
func (s *Store) snapshot(ctx context.Context, dir string) ([]store.KV, int64, error) {
	var snap []store.KV
	var rev int64
	err := s.do(ctx, "watch", dir, func(ctx context.Context, cli *clientv3.Client) error {
		var err error
		snap, rev, err = s.list(ctx, cli, dir)
		return err
	})
	return snap, rev, err
}

// follow sends the changes below dir made after revision rev until ctx
// ends (it then returns nil) or the stream is lost (it returns why).
func (s *Store) follow(ctx context.Context, dir string, rev int64, ch chan<- store.Event) error {
	cli, err := s.client()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The etcd client would silently resume the stream after a reconnect,
	// but the contract asks for a fresh EventReset after an outage: stop
	// following as soon as the connection is no longer ready.
	var lost lostReason
	conn := cli.ActiveConnection()
	go func() {
		for {
			st := conn.GetState()
			if st != connectivity.Ready {
				lost.set(fmt.Errorf("connection to etcd is %s", st))
				cancel()
				return
			}
			if !conn.WaitForStateChange(ctx, st) {
				return
			}
		}
	}()

	wch := cli.Watch(clientv3.WithRequireLeader(ctx), s.full(dir)+"/",
		clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return fmt.Errorf("revision %d compacted (now at %d): %w", rev+1, resp.CompactRevision, err)
			}
			return err
		}
		for _, ev := range resp.Events {
			var e store.Event
			switch ev.Type {
			case mvccpb.PUT:
				e = store.Event{Type: store.EventPut, KV: store.KV{
					Key: s.rel(ev.Kv.Key), Value: ev.Kv.Value, Version: ev.Kv.ModRevision}}
			case mvccpb.DELETE:
				e = store.Event{Type: store.EventDelete, KV: store.KV{Key: s.rel(ev.Kv.Key)}}
			default:
				continue
			}
			if !store.Send(ctx, ch, e) {
				return lost.get()
			}
			rev = ev.Kv.ModRevision
		}
	}
	if err := lost.get(); err != nil {
		return err
	}
	return errors.New("etcd closed the watch stream")
}

// lostReason records why the connection monitor stopped a watch.
type lostReason struct {
	mu  sync.Mutex
	err error
}

func (l *lostReason) set(err error) {
	l.mu.Lock()
	l.err = err
	l.mu.Unlock()
}

func (l *lostReason) get() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}
