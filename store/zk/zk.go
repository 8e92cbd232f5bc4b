// Package zk is the ZooKeeper backend of the store.
//
// Layout: key "a/b/c" is the znode /<prefix>/a/b/c. A znode is either a
// stored key, whose data is a one-byte header ('v') followed by the value, or
// a placeholder with no data at all that only exists because keys live below
// it (ZooKeeper needs every parent to exist). Placeholders are created on
// demand, never listed, and removed again when their last key goes.
//
// Versions: a key's version is the Mzxid of its znode, the zxid of the
// transaction that last wrote it. It is > 0, grows with every write and,
// unlike the znode's own data version, never comes back after a delete and
// re-create, so a stale version can not match a re-created key.
// Compare-and-swap reads the znode, compares Mzxid and then writes
// conditionally on the znode's data version read alongside it; the one
// change it can not see is a delete plus re-create of the key inside that
// one round trip.
//
// Liveness (Register) uses an ephemeral znode in a session of its own whose
// timeout is the TTL; watches re-arm ZooKeeper's one-shot watches.
package zk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/dnplabs/docker-net-plugin/store"
)

// sessionTimeout is the main client's session timeout (the server clamps it
// to its own minimum and maximum). Registrations use their TTL instead.
// Tests shorten it.
var sessionTimeout = 10 * time.Second

// valueHeader starts the data of every znode that holds a key.
const valueHeader = 'v'

// anyVersion in an internal delete operation means "whatever the version"
// (store.Delete); store.CheckOps never lets it through from callers.
const anyVersion = -1

// Store is a store.Store on ZooKeeper.
type Store struct {
	hosts    []string
	base     string // "/prefix", or "" for the root
	endpoint string
	user     string
	password string
	acl      []zk.ACL
	sess     *session

	life store.Lifecycle // watch and registration goroutines

	mu       sync.Mutex
	watchers map[*watcher]struct{}
}

var _ store.Store = (*Store)(nil)

// Open returns a store for a zk://host:port[,host:port...]/prefix URL. It
// does not wait for the server: the client connects in the background and
// every call waits for the connection within its own deadline.
func Open(ctx context.Context, cfg store.Config) (store.Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid, err)
	}
	if loc.Scheme != "zk" {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid,
			fmt.Errorf("scheme %q is not zk", loc.Scheme))
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid,
			errors.New("ZooKeeper digest auth needs both a username and a password"))
	}
	s := &Store{
		hosts:    loc.Hosts,
		endpoint: "zk://" + strings.Join(loc.Hosts, ","),
		user:     cfg.Username,
		password: cfg.Password,
		acl:      zk.WorldACL(zk.PermAll),
		watchers: map[*watcher]struct{}{},
	}
	if loc.Prefix != "" {
		s.base = "/" + loc.Prefix
		s.endpoint += s.base
	}
	if cfg.Username != "" {
		// Only this user may read or change what we create.
		s.acl = zk.DigestACL(zk.PermAll, cfg.Username, cfg.Password)
	}
	s.sess, err = s.dial(sessionTimeout, s.dispatch)
	if err != nil {
		return nil, store.Fail(ctx, "open", "", s.endpoint, store.ErrInvalid, err)
	}
	return s, nil
}

func (s *Store) dial(timeout time.Duration, forward func(zk.Event)) (*session, error) {
	return dial(s.hosts, timeout, s.user, s.password, s.endpoint, forward)
}

// Endpoint names the servers and the prefix.
func (s *Store) Endpoint() string { return s.endpoint }

// Close ends watches and registrations (their sessions close, so the
// server removes their keys) and closes the client.
func (s *Store) Close() error {
	if !s.life.Close() {
		return nil
	}
	s.sess.close()
	return nil
}

// path is the znode of key (or of a directory; "" is the prefix itself).
func (s *Store) path(key string) string {
	if key == "" {
		if s.base == "" {
			return "/"
		}
		return s.base
	}
	return s.base + "/" + key
}

// key is the store key of a znode below the prefix.
func (s *Store) key(p string) string {
	return strings.TrimPrefix(p, s.base+"/")
}

// child joins a znode path and a child name.
func child(p, name string) string {
	if p == "/" {
		return "/" + name
	}
	return p + "/" + name
}

// hidden reports znodes that are never keys: ZooKeeper's own /zookeeper
// tree, when the store has no prefix.
func (s *Store) hidden(p string) bool {
	return s.base == "" && (p == "/zookeeper" || strings.HasPrefix(p, "/zookeeper/"))
}

func encode(value []byte) []byte {
	data := make([]byte, 1+len(value))
	data[0] = valueHeader
	copy(data[1:], value)
	return data
}

// decode returns a key's value; ok is false for a placeholder.
func decode(data []byte) (value []byte, ok bool) {
	if len(data) == 0 {
		return nil, false
	}
	return data[1:], true
}

// isKey reports whether an existing znode holds a key.
func isKey(st *zk.Stat) bool { return st != nil && st.DataLength > 0 }

// call runs fn (ZooKeeper requests, which take no context) and returns as
// soon as it finishes or ctx ends. fn may keep running after ctx ended; it
// must only write to variables the caller reads after a nil error.
func call(ctx context.Context, fn func() error) error {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// connectWait is the longest a call waits for a usable session, whatever
// its own deadline: a plugin call then fails within seconds while the
// server is down instead of holding dockerd up, while a quick reconnect
// (a server restart) still goes unnoticed.
const connectWait = 3 * time.Second

// waitLimit is how long a call waits for a usable session before it
// reports the store unavailable: half of what is left of its deadline, at
// most connectWait, so that a server that is down gives ErrUnavailable,
// not ErrTimeout.
func waitLimit(ctx context.Context) time.Duration {
	deadline, ok := ctx.Deadline()
	if !ok {
		return min(store.DefaultTimeout/2, connectWait)
	}
	if d := time.Until(deadline) / 2; d > 0 {
		return min(d, connectWait)
	}
	return time.Millisecond
}

// run bounds one store operation: default deadline, a usable session,
// then fn in the background (fn checks ctx between its requests).
func (s *Store) run(ctx context.Context, op, key string, fn func(ctx context.Context) error) error {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	if s.life.Closed() {
		return s.fail(ctx, op, key, store.ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		return s.fail(ctx, op, key, err)
	}
	if err := s.sess.waitReady(ctx, waitLimit(ctx)); err != nil {
		return s.fail(ctx, op, key, err)
	}
	if err := call(ctx, func() error { return fn(ctx) }); err != nil {
		return s.fail(ctx, op, key, err)
	}
	return nil
}

// fail maps an error to a *store.Error.
func (s *Store) fail(ctx context.Context, op, key string, err error) error {
	var se *store.Error
	if errors.As(err, &se) {
		return err
	}
	var ce *conflictError
	if key == "" && errors.As(err, &ce) {
		key = ce.key
	}
	kind := kindOf(err)
	cause := err
	if err == kind {
		cause = nil
	}
	if kind == store.ErrUnavailable && (errors.Is(err, zk.ErrConnectionClosed) || errors.Is(err, zk.ErrSessionMoved)) {
		// The server went away mid-request (it died, or dropped its
		// clients when the ensemble lost its leader); the client moves
		// to another one (store.WithFailover retries).
		cause = store.Interrupted(err)
	}
	if strings.HasSuffix(err.Error(), "unknown error: -124") {
		// The client library does not know ZooKeeper 3.7's
		// SESSIONCLOSEDREQUIRESASLAUTH (enforce.auth).
		kind = store.ErrDenied
		cause = fmt.Errorf("the server requires authentication (set a username and password): %w", err)
	}
	return store.Fail(ctx, op, key, s.endpoint, kind, cause)
}

func kindOf(err error) error {
	switch {
	case errors.Is(err, store.ErrNotFound), errors.Is(err, zk.ErrNoNode):
		return store.ErrNotFound
	case errors.Is(err, store.ErrConflict), errors.Is(err, zk.ErrBadVersion),
		errors.Is(err, zk.ErrNodeExists), errors.Is(err, zk.ErrNotEmpty):
		return store.ErrConflict
	case errors.Is(err, store.ErrInvalid), errors.Is(err, zk.ErrInvalidPath),
		errors.Is(err, zk.ErrBadArguments), errors.Is(err, zk.ErrNoChildrenForEphemerals),
		errors.Is(err, zk.ErrInvalidACL), errors.Is(err, zk.ErrInvalidFlags):
		return store.ErrInvalid
	case errors.Is(err, context.DeadlineExceeded):
		return store.ErrTimeout
	case errors.Is(err, zk.ErrNoAuth), errors.Is(err, zk.ErrAuthFailed):
		return store.ErrDenied
	}
	// Connection lost, session expired, closed, not authorised (ACL).
	return store.ErrUnavailable
}

func validDir(dir string) error {
	if dir == "" {
		return nil
	}
	return store.ValidKey(dir)
}

// Get returns one key.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := store.ValidKey(key); err != nil {
		return store.KV{}, s.fail(ctx, "get", key, err)
	}
	var kv store.KV
	err := s.run(ctx, "get", key, func(context.Context) error {
		data, st, err := s.sess.conn.Get(s.path(key))
		if err != nil {
			return err
		}
		value, ok := decode(data)
		if !ok {
			return store.ErrNotFound
		}
		kv = store.KV{Key: key, Value: value, Version: st.Mzxid}
		return nil
	})
	return kv, err
}

// List returns every key below dir, sorted. It walks the tree, so it is
// not one atomic snapshot when keys change meanwhile.
func (s *Store) List(ctx context.Context, dir string) ([]store.KV, error) {
	if err := validDir(dir); err != nil {
		return nil, s.fail(ctx, "list", dir, err)
	}
	var kvs []store.KV
	err := s.run(ctx, "list", dir, func(ctx context.Context) error {
		var err error
		kvs, err = s.walk(ctx, s.path(dir), nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(kvs, func(i, j int) bool { return kvs[i].Key < kvs[j].Key })
	return kvs, nil
}

// walkParallel is how many reads a List keeps in flight. The client
// pipelines them over its one connection, so a directory costs about one
// round trip per walkParallel znodes instead of one per znode.
const walkParallel = 64

// walk appends the keys below znode p; a znode that vanishes meanwhile is
// skipped.
func (s *Store) walk(ctx context.Context, p string, kvs []store.KV) ([]store.KV, error) {
	names, _, err := s.sess.conn.Children(p)
	if errors.Is(err, zk.ErrNoNode) {
		return kvs, nil
	}
	if err != nil {
		return kvs, err
	}
	// Read the children's data concurrently, then go down in order.
	type read struct {
		data []byte
		st   *zk.Stat
		err  error
	}
	reads := make([]read, len(names))
	limit := make(chan struct{}, walkParallel)
	var wg sync.WaitGroup
	for i, name := range names {
		cp := child(p, name)
		if s.hidden(cp) {
			reads[i].err = zk.ErrNoNode
			continue
		}
		select {
		case limit <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-limit }()
			r := &reads[i]
			r.data, r.st, r.err = s.sess.conn.Get(cp)
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return kvs, err
	}
	for i, name := range names {
		r := reads[i]
		if errors.Is(r.err, zk.ErrNoNode) {
			continue
		}
		if r.err != nil {
			return kvs, r.err
		}
		cp := child(p, name)
		if value, ok := decode(r.data); ok {
			kvs = append(kvs, store.KV{Key: s.key(cp), Value: value, Version: r.st.Mzxid})
		}
		if r.st.NumChildren > 0 {
			if kvs, err = s.walk(ctx, cp, kvs); err != nil {
				return kvs, err
			}
		}
	}
	return kvs, nil
}

// Put writes key whatever its state.
func (s *Store) Put(ctx context.Context, key string, value []byte) (int64, error) {
	return s.write(ctx, "put", store.Put(key, value))
}

// CompareAndSwap writes key if its version is still version (0: absent).
func (s *Store) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	if err := store.CheckCAS(key, version); err != nil {
		return 0, s.fail(ctx, "cas", key, err)
	}
	op := store.Update(key, value, version)
	if version == 0 {
		op = store.Create(key, value)
	}
	return s.write(ctx, "cas", op)
}

// write applies one operation and returns the key's new version.
func (s *Store) write(ctx context.Context, name string, op store.Op) (int64, error) {
	if err := store.ValidKey(op.Key); err != nil {
		return 0, s.fail(ctx, name, op.Key, err)
	}
	var version int64
	err := s.run(ctx, name, op.Key, func(ctx context.Context) error {
		var err error
		version, err = s.apply(ctx, []store.Op{op}, true)
		return err
	})
	return version, err
}

// Delete removes key; a key with keys below it stays as a placeholder.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := store.ValidKey(key); err != nil {
		return s.fail(ctx, "delete", key, err)
	}
	return s.run(ctx, "delete", key, func(ctx context.Context) error {
		_, err := s.apply(ctx, []store.Op{{Kind: store.OpDelete, Key: key, Version: anyVersion}}, false)
		return err
	})
}

// Txn applies ops atomically with one ZooKeeper multi.
func (s *Store) Txn(ctx context.Context, ops ...store.Op) error {
	if err := store.CheckOps(ops); err != nil {
		return s.fail(ctx, "txn", "", err)
	}
	return s.run(ctx, "txn", "", func(ctx context.Context) error {
		_, err := s.apply(ctx, ops, false)
		return err
	})
}

// conflictError is a failed condition on key; it names the key in a
// transaction's error.
type conflictError struct{ key string }

func (e *conflictError) Error() string { return store.ErrConflict.Error() }
func (e *conflictError) Unwrap() error { return store.ErrConflict }

// apply reads the znodes of ops, turns ops into one multi and runs it.
// When the multi fails because a znode changed shape in between (a
// placeholder appeared or went, a parent was pruned), it starts over: the
// conditions are checked again on fresh reads, so a real conflict still
// ends as ErrConflict. With wantStat it returns the version written by the
// last op.
func (s *Store) apply(ctx context.Context, ops []store.Op, wantStat bool) (int64, error) {
	needParents := false
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if attempt > 3 {
			// Someone keeps changing these znodes: let them finish.
			select {
			case <-time.After(time.Duration(attempt) * 5 * time.Millisecond):
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
		version, retry, err := s.applyOnce(ctx, ops, wantStat, needParents)
		if !retry {
			return version, err
		}
		slog.Debug("zookeeper multi raced, retrying", "endpoint", s.endpoint, "attempt", attempt, "err", err)
		needParents = needParents || errors.Is(err, zk.ErrNoNode)
	}
}

func (s *Store) applyOnce(ctx context.Context, ops []store.Op, wantStat, needParents bool) (version int64, retry bool, err error) {
	conn := s.sess.conn
	var (
		multi   []any
		statAt  = -1
		creates []string
		deletes []string
	)
	create := func(p string, data []byte) {
		multi = append(multi, &zk.CreateRequest{Path: p, Data: data, Acl: s.acl})
		creates = append(creates, p)
		if wantStat {
			// A create returns no stat; a set in the same multi does,
			// with the multi's zxid.
			multi = append(multi, &zk.SetDataRequest{Path: p, Data: data, Version: -1})
			statAt = len(multi) - 1
		}
	}
	set := func(p string, data []byte, v int32) {
		multi = append(multi, &zk.SetDataRequest{Path: p, Data: data, Version: v})
		statAt = len(multi) - 1
	}
	conflict := func(key string) (int64, bool, error) {
		return 0, false, &conflictError{key: key}
	}

	for _, op := range ops {
		if err := ctx.Err(); err != nil {
			return 0, false, err
		}
		p := s.path(op.Key)
		exists, st, err := conn.Exists(p)
		if err != nil {
			return 0, false, err
		}
		switch op.Kind {
		case store.OpCreate:
			switch {
			case exists && isKey(st):
				return conflict(op.Key)
			case exists: // a placeholder becomes the key, if it stays one
				set(p, encode(op.Value), st.Version)
			default:
				create(p, encode(op.Value))
			}
		case store.OpPut:
			if exists {
				set(p, encode(op.Value), -1)
			} else {
				create(p, encode(op.Value))
			}
		case store.OpUpdate:
			if !exists || !isKey(st) || st.Mzxid != op.Version {
				return conflict(op.Key)
			}
			set(p, encode(op.Value), st.Version)
		case store.OpDelete:
			if !exists || !isKey(st) {
				if op.Version == anyVersion {
					continue // already gone
				}
				return conflict(op.Key)
			}
			if op.Version != anyVersion && st.Mzxid != op.Version {
				return conflict(op.Key)
			}
			if st.NumChildren > 0 {
				// Keys live below it: keep the znode as a placeholder.
				set(p, nil, st.Version)
			} else {
				multi = append(multi, &zk.DeleteRequest{Path: p, Version: st.Version})
				deletes = append(deletes, p)
			}
		default:
			return 0, false, fmt.Errorf("%w: unknown operation %d", store.ErrInvalid, op.Kind)
		}
	}
	if len(multi) == 0 {
		return 0, false, nil
	}
	if needParents {
		for _, p := range creates {
			if err := s.ensureParents(conn, p); err != nil {
				return 0, false, err
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return 0, false, err
	}
	res, err := conn.Multi(multi...)
	if err != nil {
		if raced(err) {
			return 0, true, err
		}
		return 0, false, err
	}
	for _, p := range deletes {
		s.prune(conn, path.Dir(p))
	}
	if wantStat && statAt >= 0 && statAt < len(res) && res[statAt].Stat != nil {
		version = res[statAt].Stat.Mzxid
	}
	return version, false, nil
}

// raced reports the multi failures that mean "a znode changed between the
// reads and the multi".
func raced(err error) bool {
	return errors.Is(err, zk.ErrNodeExists) || errors.Is(err, zk.ErrNoNode) ||
		errors.Is(err, zk.ErrBadVersion) || errors.Is(err, zk.ErrNotEmpty)
}

// ensureParents creates the missing ancestors of znode p as placeholders.
func (s *Store) ensureParents(conn *zk.Conn, p string) error {
	parent := path.Dir(p)
	if parent == "/" {
		return nil
	}
	if ok, _, err := conn.Exists(parent); err != nil || ok {
		return err
	}
	at := ""
	for _, part := range strings.Split(strings.TrimPrefix(parent, "/"), "/") {
		at += "/" + part
		_, err := conn.Create(at, nil, 0, s.acl)
		if err != nil && !errors.Is(err, zk.ErrNodeExists) {
			return fmt.Errorf("create parent %s: %w", at, err)
		}
	}
	return nil
}

// prune removes empty placeholders from p upwards, below the prefix. It is
// best effort: a writer that loses its parent to it retries.
func (s *Store) prune(conn *zk.Conn, p string) {
	for p != "/" && p != "." && p != s.base && strings.HasPrefix(p, s.base+"/") {
		exists, st, err := conn.Exists(p)
		if err != nil || !exists || isKey(st) || st.NumChildren > 0 {
			return
		}
		if err := conn.Delete(p, st.Version); err != nil {
			return
		}
		p = path.Dir(p)
	}
}
