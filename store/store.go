// Package store is the one place that talks to a key-value store.
//
// Everything the plugin keeps (networks, endpoints, hosts, IP allocations)
// lives behind the Store interface. Backends (bolt, etcd, consul, zk) are
// chosen by URL with Open and all pass the same conformance suite in
// store/storetest.
//
// Keys are slash-separated relative paths such as "ipam/pools/p1/10.0.0.5".
// They never start or end with "/" and have no empty segments; the backend
// puts them under its own prefix (from the URL). A "directory" is any key
// prefix that ends at a segment boundary: List("ipam/pools") returns every key
// below ipam/pools/, at any depth, but not "ipam/pools" itself.
package store

import (
	"context"
	"time"
)

// KV is one key, its value and the version of its last write.
type KV struct {
	Key   string
	Value []byte
	// Version is > 0 for every stored key and changes on every write to it.
	// It is what compare-and-swap compares.
	Version int64
}

// OpKind says what one transaction operation does.
type OpKind int

const (
	// OpCreate writes the key; it fails the transaction if the key exists.
	OpCreate OpKind = iota + 1
	// OpUpdate writes the key; it fails the transaction unless the key
	// exists with exactly Version.
	OpUpdate
	// OpDelete removes the key; it fails the transaction unless the key
	// exists with exactly Version.
	OpDelete
	// OpPut writes the key whatever its state.
	OpPut
)

func (k OpKind) String() string {
	switch k {
	case OpCreate:
		return "create"
	case OpUpdate:
		return "update"
	case OpDelete:
		return "delete"
	case OpPut:
		return "put"
	}
	return "unknown"
}

// Op is one operation of a transaction. Build them with Create, Update,
// Delete and Put.
type Op struct {
	Kind    OpKind
	Key     string
	Value   []byte
	Version int64
}

// Create is an operation that writes key only if it does not exist.
func Create(key string, value []byte) Op { return Op{Kind: OpCreate, Key: key, Value: value} }

// Update is an operation that writes key only if it is still at version.
func Update(key string, value []byte, version int64) Op {
	return Op{Kind: OpUpdate, Key: key, Value: value, Version: version}
}

// Delete is an operation that removes key only if it is still at version.
func Delete(key string, version int64) Op { return Op{Kind: OpDelete, Key: key, Version: version} }

// Put is an operation that writes key unconditionally.
func Put(key string, value []byte) Op { return Op{Kind: OpPut, Key: key, Value: value} }

// MaxTxnOps is the most operations one transaction may hold (the smallest
// limit of the backends, Consul's and etcd's).
const MaxTxnOps = 64

// EventType says what a watch event reports.
type EventType int

const (
	// EventPut: KV was created or changed.
	EventPut EventType = iota + 1
	// EventDelete: KV.Key was removed (KV.Value is empty).
	EventDelete
	// EventReset: Snapshot holds the whole current content of the watched
	// directory; the receiver replaces whatever it had. Every watch starts
	// with one, and sends another whenever it lost track of changes and
	// cannot replay them (etcd compaction, Consul index reset, ZooKeeper
	// session expiry, or any reconnect on Consul and ZooKeeper).
	EventReset
)

func (t EventType) String() string {
	switch t {
	case EventPut:
		return "put"
	case EventDelete:
		return "delete"
	case EventReset:
		return "reset"
	}
	return "unknown"
}

// Event is one change seen by a watch.
type Event struct {
	Type     EventType
	KV       KV   // for EventPut and EventDelete
	Snapshot []KV // for EventReset, sorted by key
}

// Store is a key-value store shared by every host of the cluster.
//
// Every method takes a context; a backend applies its own default deadline
// (see DefaultTimeout) when the context has none, so no call hangs. Errors
// match ErrNotFound, ErrConflict, ErrUnavailable or ErrTimeout with
// errors.Is, and name the key and the store endpoint.
type Store interface {
	// Get returns one key, or ErrNotFound.
	Get(ctx context.Context, key string) (KV, error)
	// List returns every key below dir (at any depth), sorted by key.
	List(ctx context.Context, dir string) ([]KV, error)
	// Put writes key unconditionally and returns its new version.
	Put(ctx context.Context, key string, value []byte) (int64, error)
	// Delete removes key; removing a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// CompareAndSwap writes key if its version is still version (0 means
	// "must not exist") and returns the new version; otherwise it returns
	// ErrConflict and writes nothing.
	CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error)
	// Txn applies ops atomically: all of them or none. If any condition
	// fails it returns ErrConflict and nothing is written. At most
	// MaxTxnOps operations, each key at most once.
	Txn(ctx context.Context, ops ...Op) error
	// Watch streams the changes below dir, starting with an EventReset
	// that holds the current content. It reconnects by itself after the
	// store was unreachable; then it either resumes with every change it
	// missed, as ordinary events, or, when the store cannot replay them,
	// sends a fresh EventReset. Either way no change is lost across an
	// outage. Events for one key come in the order they happened, but
	// delivery is at least once: an event may repeat, so receivers must be
	// idempotent. The channel is closed when ctx is done or the store is
	// closed.
	Watch(ctx context.Context, dir string) (<-chan Event, error)
	// Register writes key=value bound to this client's liveness: the key
	// disappears within ttl after the process dies or loses the store
	// (etcd lease, Consul session, ZooKeeper ephemeral node) and is written
	// again when the store comes back. The embedded store just keeps it.
	// Release (or ctx ending) removes the key.
	Register(ctx context.Context, key string, value []byte, ttl time.Duration) (Registration, error)
	// RegisterIf is Register that takes over a key that exists (another
	// client's live registration, or this host's previous run whose
	// liveness has not run out yet) only when mayTakeOver(current value)
	// returns nil. Otherwise it fails with an error that matches
	// ErrConflict and wraps mayTakeOver's error, and leaves the key alone.
	// The check and the write are one atomic step. Whenever the
	// registration writes the key again later (after its lease or session
	// was lost), the same check applies; while it refuses, the key is left
	// to its holder and the write is retried. A nil mayTakeOver takes any
	// key over, as Register does. Release (and the end of the
	// registration) only ever deletes the key while this registration
	// still holds it.
	RegisterIf(ctx context.Context, key string, value []byte, ttl time.Duration, mayTakeOver TakeOver) (Registration, error)
	// Endpoint names the server(s) this store talks to, for messages.
	Endpoint() string
	// Close releases the client; registrations end with it.
	Close() error
}

// TakeOver decides whether RegisterIf may replace a key that exists, from
// its current value: nil lets it, an error refuses (and says why).
type TakeOver func(current []byte) error

// Registration is a live key written by Store.Register.
type Registration interface {
	// Release deletes the key, if this registration still holds it (never
	// a value another registration wrote since), and stops keeping it alive.
	Release(ctx context.Context) error
}

// DefaultTimeout bounds a store call whose context has no deadline.
const DefaultTimeout = 5 * time.Second

// WithTimeout returns ctx with DefaultTimeout applied if it has no deadline.
func WithTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, DefaultTimeout)
}
