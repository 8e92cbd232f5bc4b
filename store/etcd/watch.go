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
// content was read at. When it loses that stream (lost connection, server
// restart, leader change) it follows on from the last revision it saw, so
// the receiver gets what changed meanwhile as ordinary events, without the
// directory being read again. Only when etcd no longer has that history
// (compacted), or the server's revision went back (a store restored from a
// backup or replaced), does it read the directory again and send a new
// EventReset. The channel closes when ctx ends or the store is closed.
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
	// fail logs the first of a run of failures and waits before the next
	// attempt; it reports false when ctx ended.
	fail := func(msg string, err error) bool {
		if !failing {
			log.Warn(msg, "err", err)
			failing = true
		}
		return r.Wait(ctx)
	}
	var rev int64 // every change up to this revision was sent; 0: none yet
	for {
		if rev != 0 {
			// A store now behind the revision already seen is not the
			// one followed so far (restored from a backup, or wiped):
			// from rev on, its revisions mean something else.
			now, err := s.current(ctx, dir)
			if err != nil {
				if ctx.Err() != nil || !fail("store watch cannot reach the store; retrying", err) {
					return
				}
				continue
			}
			if now < rev {
				log.Warn("store watch found the store behind the revision it had seen; reading the directory again",
					"seen", rev, "now", now)
				rev = 0
			} else if failing {
				log.Info("store watch resumes", "revision", rev)
				failing = false
			}
		}
		if rev == 0 {
			snap, at, err := s.snapshot(ctx, dir)
			if err != nil {
				if ctx.Err() != nil || !fail("store watch cannot read the directory; retrying", err) {
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
			rev = at
		}
		started := time.Now()
		var err error
		rev, err = s.follow(ctx, dir, rev, ch)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > healthyRun {
			r.Reset()
		}
		if errors.Is(err, rpctypes.ErrCompacted) {
			log.Info("store watch missed changes etcd no longer has; reading the directory again", "err", err)
			rev = 0
			continue // not an outage: no need to wait
		}
		log.Info("store watch interrupted; resuming", "err", err, "revision", rev)
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

// current returns the server's current revision, bounded by the default
// timeout. It reads one key (the directory's own name), not the directory.
func (s *Store) current(ctx context.Context, dir string) (int64, error) {
	var rev int64
	err := s.do(ctx, "watch", dir, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Get(ctx, s.full(dir), clientv3.WithKeysOnly())
		if err != nil {
			return err
		}
		rev = resp.Header.Revision
		return nil
	})
	return rev, err
}

// follow sends the changes below dir made after revision rev until ctx
// ends (it then returns nil) or the stream is lost (it returns why). It
// returns the last revision whose changes were all sent; the error matches
// rpctypes.ErrCompacted when the changes after rev can no longer be had.
func (s *Store) follow(ctx context.Context, dir string, rev int64, ch chan<- store.Event) (int64, error) {
	cli, err := s.client()
	if err != nil {
		return rev, err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The etcd client would silently resume the stream after a reconnect;
	// stop following as soon as the connection is no longer ready instead,
	// so that every resume goes through the caller's check of the store's
	// revision.
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

	// Progress notifications carry the revision the watch has reached
	// when nothing below dir changed, so a resume after a quiet spell
	// starts from there, not from a revision compacted meanwhile.
	wch := cli.Watch(clientv3.WithRequireLeader(ctx), s.full(dir)+"/",
		clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				return rev, fmt.Errorf("revision %d compacted (now at %d): %w", rev+1, resp.CompactRevision, err)
			}
			return rev, err
		}
		if resp.IsProgressNotify() {
			// etcd sends these only to a watch that has sent every
			// change up to the revision in the header.
			rev = max(rev, resp.Header.Revision)
			continue
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
			// Events of one transaction share a revision: rev moves on
			// only once the whole revision was sent, so a resume sends
			// again what may not have been (at least once).
			rev = max(rev, ev.Kv.ModRevision-1)
			if !store.Send(ctx, ch, e) {
				return rev, lost.get()
			}
		}
		if n := len(resp.Events); n > 0 {
			rev = max(rev, resp.Events[n-1].Kv.ModRevision)
		}
	}
	if err := lost.get(); err != nil {
		return rev, err
	}
	return rev, errors.New("etcd closed the watch stream")
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
