// Package bolt is the embedded store: one file on this host, no server.
//
// Every call opens the file under an exclusive lock, does its work in one
// bbolt transaction and closes it again, so several processes on one host
// (the plugin, the status command, tests) can share the file safely.
// Watches poll a global revision counter and diff the watched directory.
package bolt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/dnplabs/docker-net-plugin/store"
)

var (
	kvBucket   = []byte("kv")
	metaBucket = []byte("meta")
	revKey     = []byte("revision")
)

// PollInterval is how often a watch looks for changes made by other processes.
const PollInterval = 100 * time.Millisecond

// Store is the embedded bolt store.
type Store struct {
	path string
	url  string

	mu      sync.Mutex // serialises this process's opens of the file
	changed chan struct{}
	life    store.Lifecycle // watches and registrations
}

// Open returns the store kept in the file of cfg.URL (bolt:///path/file.db),
// creating the file and its directory when missing.
func Open(ctx context.Context, cfg store.Config) (*Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	if loc.Scheme != "bolt" {
		return nil, fmt.Errorf("%w: bolt store given URL %q", store.ErrInvalid, cfg.URL)
	}
	if err := os.MkdirAll(filepath.Dir(loc.Path), 0o700); err != nil {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrUnavailable, err)
	}
	s := &Store{path: loc.Path, url: cfg.URL, changed: make(chan struct{})}
	// The first write creates the buckets.
	if err := s.update(ctx, "open", "", func(*bbolt.Tx) error { return nil }); err != nil {
		return nil, err
	}
	return s, nil
}

// Endpoint names the file.
func (s *Store) Endpoint() string { return s.url }

// Close ends this client's watches and registrations. The file itself
// stays usable: later calls simply open it again.
func (s *Store) Close() error {
	s.life.Close()
	return nil
}

// with opens the file under the lock file's exclusive lock, runs fn and closes it.
func (s *Store) with(ctx context.Context, op, key string, writable bool, fn func(tx *bbolt.Tx) error) error {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	if err := ctx.Err(); err != nil {
		return store.Fail(ctx, op, key, s.url, store.ErrTimeout, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	unlock, err := lockFile(ctx, s.path+".lock")
	if err != nil {
		return store.Fail(ctx, op, key, s.url, store.ErrTimeout, err)
	}
	defer unlock()
	db, err := bbolt.Open(s.path, 0o600, &bbolt.Options{Timeout: time.Second})
	if err != nil {
		return store.Fail(ctx, op, key, s.url, store.ErrUnavailable, err)
	}
	defer db.Close()
	if !writable {
		return db.View(func(tx *bbolt.Tx) error {
			if tx.Bucket(kvBucket) == nil || tx.Bucket(metaBucket) == nil {
				return store.Fail(ctx, op, key, s.url, store.ErrUnavailable, errors.New("not a store file (no buckets)"))
			}
			return fn(tx)
		})
	}
	return db.Update(func(tx *bbolt.Tx) error {
		for _, b := range [][]byte{kvBucket, metaBucket} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return fn(tx)
	})
}

func (s *Store) view(ctx context.Context, op, key string, fn func(tx *bbolt.Tx) error) error {
	return s.with(ctx, op, key, false, fn)
}

func (s *Store) update(ctx context.Context, op, key string, fn func(tx *bbolt.Tx) error) error {
	err := s.with(ctx, op, key, true, fn)
	if err == nil {
		s.notify()
	}
	return err
}

// notify wakes this process's watches at once instead of at their next poll.
func (s *Store) notify() {
	s.mu.Lock()
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// lockFile takes an exclusive flock on path, retrying until ctx ends.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: another process holds it: %w", path, ctx.Err())
		case <-time.After(time.Millisecond):
		}
	}
}

// A stored value is its 8-byte version followed by the value itself.
func encode(version int64, value []byte) []byte {
	b := make([]byte, 8+len(value))
	binary.BigEndian.PutUint64(b, uint64(version))
	copy(b[8:], value)
	return b
}

func decode(key, raw []byte) store.KV {
	return store.KV{
		Key:     string(key),
		Version: int64(binary.BigEndian.Uint64(raw[:8])),
		Value:   append([]byte(nil), raw[8:]...),
	}
}

func nextRevision(tx *bbolt.Tx) (int64, error) {
	meta := tx.Bucket(metaBucket)
	var rev uint64
	if b := meta.Get(revKey); b != nil {
		rev = binary.BigEndian.Uint64(b)
	}
	rev++
	buf := make([]byte, 8)
	binary.BigEndian.PutUint64(buf, rev)
	return int64(rev), meta.Put(revKey, buf)
}

func revision(tx *bbolt.Tx) int64 {
	if b := tx.Bucket(metaBucket).Get(revKey); b != nil {
		return int64(binary.BigEndian.Uint64(b))
	}
	return 0
}

// Get returns one key.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := store.ValidKey(key); err != nil {
		return store.KV{}, err
	}
	var kv store.KV
	var found bool
	err := s.view(ctx, "get", key, func(tx *bbolt.Tx) error {
		if raw := tx.Bucket(kvBucket).Get([]byte(key)); raw != nil {
			kv, found = decode([]byte(key), raw), true
		}
		return nil
	})
	if err != nil {
		return store.KV{}, err
	}
	if !found {
		return store.KV{}, store.Fail(ctx, "get", key, s.url, store.ErrNotFound, nil)
	}
	return kv, nil
}

// List returns every key below dir.
func (s *Store) List(ctx context.Context, dir string) ([]store.KV, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, err
	}
	var out []store.KV
	err := s.view(ctx, "list", dir, func(tx *bbolt.Tx) error {
		out = list(tx, dir)
		return nil
	})
	return out, err
}

func list(tx *bbolt.Tx, dir string) []store.KV {
	prefix := []byte(dir + "/")
	var out []store.KV
	c := tx.Bucket(kvBucket).Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		out = append(out, decode(k, v))
	}
	return out
}

// Put writes key unconditionally.
func (s *Store) Put(ctx context.Context, key string, value []byte) (int64, error) {
	return s.apply(ctx, "put", store.Put(key, value))
}

// Delete removes key if present.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := store.ValidKey(key); err != nil {
		return err
	}
	return s.update(ctx, "delete", key, func(tx *bbolt.Tx) error {
		b := tx.Bucket(kvBucket)
		if b.Get([]byte(key)) == nil {
			return nil
		}
		if _, err := nextRevision(tx); err != nil {
			return err
		}
		return b.Delete([]byte(key))
	})
}

// CompareAndSwap writes key if it is still at version (0: absent).
func (s *Store) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	op := store.Create(key, value)
	if version != 0 {
		op = store.Update(key, value, version)
	}
	return s.apply(ctx, "cas", op)
}

func (s *Store) apply(ctx context.Context, name string, op store.Op) (int64, error) {
	var rev int64
	err := s.txn(ctx, name, func(r int64) { rev = r }, op)
	return rev, err
}

// Txn applies ops atomically.
func (s *Store) Txn(ctx context.Context, ops ...store.Op) error {
	return s.txn(ctx, "txn", nil, ops...)
}

var errConflict = errors.New("condition failed")

func (s *Store) txn(ctx context.Context, name string, done func(int64), ops ...store.Op) error {
	if err := store.CheckOps(ops); err != nil {
		return err
	}
	var failed string
	err := s.update(ctx, name, ops[0].Key, func(tx *bbolt.Tx) error {
		b := tx.Bucket(kvBucket)
		for _, op := range ops {
			raw := b.Get([]byte(op.Key))
			var ok bool
			switch op.Kind {
			case store.OpCreate:
				ok = raw == nil
			case store.OpUpdate, store.OpDelete:
				ok = raw != nil && decode(nil, raw).Version == op.Version
			case store.OpPut:
				ok = true
			}
			if !ok {
				failed = op.Key
				return errConflict
			}
		}
		rev, err := nextRevision(tx)
		if err != nil {
			return err
		}
		for _, op := range ops {
			if op.Kind == store.OpDelete {
				err = b.Delete([]byte(op.Key))
			} else {
				err = b.Put([]byte(op.Key), encode(rev, op.Value))
			}
			if err != nil {
				return err
			}
		}
		if done != nil {
			done(rev)
		}
		return nil
	})
	if errors.Is(err, errConflict) {
		return store.Fail(ctx, name, failed, s.url, store.ErrConflict, nil)
	}
	var serr *store.Error
	if err != nil && !errors.As(err, &serr) {
		return store.Fail(ctx, name, ops[0].Key, s.url, store.ErrUnavailable, err)
	}
	return err
}

// Watch polls the revision and reports what changed below dir.
func (s *Store) Watch(ctx context.Context, dir string) (<-chan store.Event, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, err
	}
	return s.life.Watch(ctx, s.url, dir, func(ctx context.Context, ch chan<- store.Event) { s.watch(ctx, dir, ch) })
}

func (s *Store) watch(ctx context.Context, dir string, ch chan<- store.Event) {
	var (
		known   map[string]store.KV // nil until the first snapshot was sent
		lastRev int64               = -1
	)
	for {
		s.mu.Lock()
		wake := s.changed
		s.mu.Unlock()

		var rev int64
		var snap []store.KV
		err := s.view(ctx, "watch", dir, func(tx *bbolt.Tx) error {
			rev = revision(tx)
			if rev != lastRev {
				snap = list(tx, dir)
			}
			return nil
		})
		switch {
		case err != nil:
			// Unreadable for now: try again at the next poll, then resync.
			known = nil
		case known == nil:
			if !store.Send(ctx, ch, store.Event{Type: store.EventReset, Snapshot: snap}) {
				return
			}
			known, lastRev = store.ByKey(snap), rev
		case rev != lastRev:
			for _, ev := range store.Diff(known, snap) {
				if !store.Send(ctx, ch, ev) {
					return
				}
			}
			known, lastRev = store.ByKey(snap), rev
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-time.After(PollInterval):
		}
	}
}

// Register writes the key; on one host there is no one to outlive, so it
// simply stays until Release, ctx's end or Close.
func (s *Store) Register(ctx context.Context, key string, value []byte, ttl time.Duration) (store.Registration, error) {
	return s.RegisterIf(ctx, key, value, ttl, nil)
}

// RegisterIf is Register that takes an existing key over only when
// mayTakeOver allows it (see store.Store).
func (s *Store) RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver store.TakeOver) (store.Registration, error) {
	if s.life.Closed() {
		return nil, store.Fail(ctx, "register", key, s.url, store.ErrUnavailable, store.ErrClosed)
	}
	var version int64
	for try := 0; ; try++ {
		op := store.Create(key, value)
		kv, err := s.Get(ctx, key)
		switch {
		case err == nil:
			if mayTakeOver != nil {
				if why := mayTakeOver(kv.Value); why != nil {
					return nil, store.Fail(ctx, "register", key, s.url, store.ErrConflict, why)
				}
			}
			op = store.Update(key, value, kv.Version)
		case !errors.Is(err, store.ErrNotFound):
			return nil, err
		}
		version, err = s.apply(ctx, "register", op)
		if err == nil {
			break
		}
		if !errors.Is(err, store.ErrConflict) || try == 10 {
			return nil, err
		}
	}
	r := &registration{s: s, key: key, version: version}
	// Nothing to keep alive: the key stays until Release, ctx's end or Close.
	reg, err := s.life.KeepAlive(ctx, func(ctx context.Context) { <-ctx.Done() }, r.lost, r.remove)
	if err != nil {
		return nil, store.Fail(ctx, "register", key, s.url, store.ErrUnavailable, err)
	}
	return reg, nil
}

type registration struct {
	s       *Store
	key     string
	version int64 // of the key as this registration wrote it
}

// lost deletes the key when the registration ended without Release.
func (r *registration) lost() { r.remove(context.Background()) }

// remove deletes the key if it is still as this registration wrote it
// (Release).
func (r *registration) remove(ctx context.Context) error {
	err := r.s.Txn(ctx, store.Delete(r.key, r.version))
	if errors.Is(err, store.ErrConflict) {
		return nil // rewritten since, by another registration: theirs now
	}
	return err
}

var _ store.Store = (*Store)(nil)
