package zk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Watch backoff after a failed read of the watched tree.
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// watcher keeps a copy of the tree below one directory up to date with
// ZooKeeper's one-shot watches.
//
// Every znode of the tree has a data watch (GetW) and a child watch
// (ChildrenW) armed; the missing directory itself has an exists watch. The
// client reports every fired watch to the store's event callback, which
// queues it here. A fired watch only clears its "armed" flag; the loop then
// walks its copy of the tree and re-reads (and re-arms) exactly the znodes
// whose flags are clear, so a change costs a few requests and each znode
// carries at most one watch of each kind. After any connection loss all
// flags are cleared: everything is read again and the receiver gets an
// EventReset.
type watcher struct {
	s    *Store
	root string // znode of the watched directory
	out  chan<- store.Event

	mu      sync.Mutex
	pending []zk.Event
	wake    chan struct{} // capacity 1: "pending is not empty"

	// Owned by the loop goroutine.
	nodes       map[string]*wnode // by znode path, root included
	rootWatched bool              // exists watch armed on the missing root
	sent        map[string]store.KV
}

// wnode is what the watcher knows of one znode.
type wnode struct {
	isKey      bool
	value      []byte
	version    int64
	children   []string // names, sorted
	dataArmed  bool     // value is current until a data event arrives
	childArmed bool     // children are current until a child event arrives
}

// Watch streams the changes below dir; see store.Store.
func (s *Store) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	if err := validDir(dir); err != nil {
		return nil, s.fail(ctx, "watch", dir, err)
	}
	w := &watcher{
		s:     s,
		root:  s.path(dir),
		wake:  make(chan struct{}, 1),
		nodes: map[string]*wnode{},
	}
	return s.life.Watch(ctx, s.endpoint, dir, func(ctx context.Context, ch chan<- store.Event) {
		w.out = ch
		// Listening before the first watch is armed.
		s.mu.Lock()
		s.watchers[w] = struct{}{}
		s.mu.Unlock()
		defer func() {
			s.mu.Lock()
			delete(s.watchers, w)
			s.mu.Unlock()
		}()
		w.run(ctx)
	})
}

// dispatch hands a client event to the watchers it concerns. It runs on
// the client's goroutines and must not block.
func (s *Store) dispatch(ev zk.Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for w := range s.watchers {
		if ev.Type == zk.EventSession || w.covers(ev.Path) {
			w.notify(ev)
		}
	}
}

func (w *watcher) covers(p string) bool {
	return w.root == "/" || p == w.root || strings.HasPrefix(p, w.root+"/")
}

func (w *watcher) notify(ev zk.Event) {
	w.mu.Lock()
	w.pending = append(w.pending, ev)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *watcher) run(ctx context.Context) {
	reset := true
	backoff := minBackoff
	for {
		if err := w.s.sess.waitReady(ctx, 0); err != nil {
			return
		}
		if w.drain() {
			reset = true
		}
		if reset {
			// Watches may have been lost with the connection: read
			// and arm everything again.
			w.nodes = map[string]*wnode{}
			w.rootWatched = false
		}
		if err := w.refresh(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			slog.Debug("zookeeper watch: read failed, retrying", "endpoint", w.s.endpoint, "dir", w.root, "err", err, "backoff", backoff)
			reset = true
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			backoff = min(2*backoff, maxBackoff)
			continue
		}
		backoff = minBackoff
		if !w.emit(ctx, reset) {
			return
		}
		reset = false
		select {
		case <-w.wake:
		case <-ctx.Done():
			return
		}
	}
}

// drain applies the queued events to the armed flags. It reports whether
// the connection was lost since the last call.
func (w *watcher) drain() (lost bool) {
	w.mu.Lock()
	events := w.pending
	w.pending = nil
	w.mu.Unlock()
	for _, ev := range events {
		n := w.nodes[ev.Path]
		switch ev.Type {
		case zk.EventSession:
			if ev.State != zk.StateHasSession {
				lost = true
			}
		case zk.EventNotWatching:
			lost = true
		case zk.EventNodeCreated:
			if ev.Path == w.root {
				w.rootWatched = false
			}
		case zk.EventNodeDataChanged:
			if ev.Path == w.root {
				w.rootWatched = false
			}
			if n != nil {
				n.dataArmed = false
			}
		case zk.EventNodeChildrenChanged:
			if n != nil {
				n.childArmed = false
			}
		case zk.EventNodeDeleted:
			if ev.Path == w.root {
				w.rootWatched = false
			}
			if n != nil {
				n.dataArmed = false
				n.childArmed = false
			}
		}
	}
	return lost
}

// refresh brings the copy of the tree up to date, re-arming the watches
// that fired.
func (w *watcher) refresh(ctx context.Context) error {
	for range 10 {
		ok, err := w.load(ctx, w.root, true)
		if err != nil || ok {
			return err
		}
		// The directory does not exist: watch for its creation.
		w.nodes = map[string]*wnode{}
		if w.rootWatched {
			return nil
		}
		var exists bool
		err = call(ctx, func() error {
			var err error
			exists, _, _, err = w.s.sess.conn.ExistsW(w.root)
			return err
		})
		if err != nil {
			return err
		}
		w.rootWatched = true
		if !exists {
			return nil
		}
		// Created meanwhile: read it.
	}
	return fmt.Errorf("%s keeps being created and deleted", w.root)
}

// load reads znode p where its watches fired (or were never armed), then
// its children. It reports false when p does not exist.
func (w *watcher) load(ctx context.Context, p string, isRoot bool) (bool, error) {
	conn := w.s.sess.conn
	n := w.nodes[p]
	if n == nil {
		n = &wnode{}
	}
	// arm runs a read of p that arms a watch; gone: p does not exist (and
	// is forgotten).
	arm := func(read func() error) (gone bool, err error) {
		err = call(ctx, read)
		if errors.Is(err, zk.ErrNoNode) {
			w.forget(p)
			return true, nil
		}
		return false, err
	}
	if !isRoot && !n.dataArmed {
		var data []byte
		var st *zk.Stat
		gone, err := arm(func() (err error) {
			data, st, _, err = conn.GetW(p)
			return err
		})
		if gone || err != nil {
			return false, err
		}
		n.value, n.isKey = decode(data)
		n.version = st.Mzxid
		n.dataArmed = true
	}
	if !n.childArmed {
		var names []string
		gone, err := arm(func() (err error) {
			names, _, _, err = conn.ChildrenW(p)
			return err
		})
		if gone || err != nil {
			return false, err
		}
		sort.Strings(names)
		keep := make(map[string]bool, len(names))
		for _, name := range names {
			keep[name] = true
		}
		for _, name := range n.children {
			if !keep[name] {
				w.forget(child(p, name))
			}
		}
		n.children = names
		n.childArmed = true
	}
	w.nodes[p] = n
	for _, name := range n.children {
		cp := child(p, name)
		if w.s.hidden(cp) {
			continue
		}
		if _, err := w.load(ctx, cp, false); err != nil {
			return false, err
		}
	}
	return true, nil
}

// forget drops znode p and everything known below it.
func (w *watcher) forget(p string) {
	n := w.nodes[p]
	if n == nil {
		return
	}
	delete(w.nodes, p)
	for _, name := range n.children {
		w.forget(child(p, name))
	}
}

// snapshot is the current content of the watched directory.
func (w *watcher) snapshot() map[string]store.KV {
	kvs := map[string]store.KV{}
	var walk func(p string)
	walk = func(p string) {
		n := w.nodes[p]
		if n == nil {
			return
		}
		for _, name := range n.children {
			cp := child(p, name)
			c := w.nodes[cp]
			if c == nil {
				continue
			}
			if c.isKey {
				key := w.s.key(cp)
				kvs[key] = store.KV{Key: key, Value: c.value, Version: c.version}
			}
			walk(cp)
		}
	}
	walk(w.root)
	return kvs
}

// emit sends the receiver a reset or the differences since the last
// emit. It reports false when ctx ended first.
func (w *watcher) emit(ctx context.Context, reset bool) bool {
	cur := w.snapshot()
	var events []store.Event
	if reset || w.sent == nil {
		events = append(events, store.Event{Type: store.EventReset, Snapshot: sorted(cur)})
	} else {
		events = store.Diff(w.sent, sorted(cur))
	}
	w.sent = cur
	for _, ev := range events {
		if !store.Send(ctx, w.out, ev) {
			return false
		}
	}
	return true
}

func sorted(kvs map[string]store.KV) []store.KV {
	out := make([]store.KV, 0, len(kvs))
	for _, kv := range kvs {
		out = append(out, kv)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}
