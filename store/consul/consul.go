// Package consul is the store backed by HashiCorp Consul's KV store.
//
// Keys live under "<prefix>/" (the prefix comes from the URL
// consul://h1:8500,h2:8500/prefix). A key's version is its Consul
// ModifyIndex. Every write goes through /v1/txn, which applies all of its
// operations or none and returns the new index: compare-and-swap is a "cas"
// operation (index 0 means "must not exist"), a versioned delete is a
// "check-index" followed by a "delete". Watches are blocking queries on the
// directory, diffed against what was seen before. Registrations are keys
// held by a Consul session with a TTL (see Register).
//
// Open does not contact the server: calls made while no server answers fail
// with ErrUnavailable or ErrTimeout and work again once one does. With
// several servers, a call that cannot reach one tries the next.
package consul

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/dnplabs/docker-net-plugin/store"
)

const (
	// dialTimeout bounds connecting to a server, so a stopped or
	// unreachable server is reported well within a call's deadline.
	dialTimeout = time.Second
)

// Store is a store.Store on a Consul cluster.
type Store struct {
	endpoint string // consul://h1:8500,h2:8500/prefix, for messages
	root     string // "prefix/" (or ""): what every key is put under

	clients    []*api.Client // one per server, in URL order
	transports []*http.Transport
	current    atomic.Int32 // index of the server that last answered

	life store.Lifecycle // running watches and registrations
}

// Open returns the Consul store named by cfg.URL. The ACL token is
// cfg.Token; https is used when cfg.CAFile or cfg.CertFile is set. Open
// checks the URL and TLS files but does not wait for a server.
func Open(ctx context.Context, cfg store.Config) (store.Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid, err)
	}
	if loc.Scheme != "consul" {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid,
			fmt.Errorf("consul store given a %q URL", loc.Scheme))
	}
	s := &Store{endpoint: "consul://" + strings.Join(loc.Hosts, ",") + "/" + loc.Prefix}
	if loc.Prefix != "" {
		s.root = loc.Prefix + "/"
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, store.Fail(ctx, "open", "", s.endpoint, store.ErrInvalid,
			errors.New("a client certificate needs both the certificate and the key file"))
	}
	scheme := "http"
	if cfg.CAFile != "" || cfg.CertFile != "" {
		scheme = "https"
	}
	for _, host := range loc.Hosts {
		tr := &http.Transport{
			Proxy:               http.ProxyFromEnvironment,
			DialContext:         (&net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}).DialContext,
			TLSHandshakeTimeout: 2 * time.Second,
			MaxIdleConnsPerHost: 16,
			IdleConnTimeout:     90 * time.Second,
		}
		c, err := api.NewClient(&api.Config{
			Address:   host,
			Scheme:    scheme,
			Transport: tr,
			Token:     cfg.Token,
			TLSConfig: api.TLSConfig{CAFile: cfg.CAFile, CertFile: cfg.CertFile, KeyFile: cfg.KeyFile},
		})
		if err != nil {
			return nil, store.Fail(ctx, "open", "", s.endpoint, store.ErrInvalid,
				fmt.Errorf("consul client for %s: %w", host, err))
		}
		s.clients = append(s.clients, c)
		s.transports = append(s.transports, tr)
	}
	return s, nil
}

// Endpoint names the servers and the prefix.
func (s *Store) Endpoint() string { return s.endpoint }

// Close ends the watches and registrations (destroying their sessions,
// which deletes their keys). The watch channels are closed when it returns.
func (s *Store) Close() error {
	if !s.life.Close() {
		return nil
	}
	for _, tr := range s.transports {
		tr.CloseIdleConnections()
	}
	return nil
}

// full is the Consul key of a store key.
func (s *Store) full(key string) string { return s.root + key }

// do runs fn against the servers in turn, starting with the one that last
// answered, and moves on to the next only when a server cannot be reached.
// ctx must already carry the call's deadline.
func (s *Store) do(ctx context.Context, fn func(c *api.Client) error) error {
	first := int(s.current.Load())
	var err error
	for i := range s.clients {
		n := (first + i) % len(s.clients)
		err = fn(s.clients[n])
		if err == nil {
			s.current.Store(int32(n))
			return nil
		}
		var ue *url.Error
		if !errors.As(err, &ue) || ctx.Err() != nil {
			return err
		}
	}
	return err
}

// fail turns a Consul client error into a *store.Error of the right kind.
func (s *Store) fail(ctx context.Context, op, key string, err error) error {
	kind := store.ErrUnavailable
	var se api.StatusError
	switch {
	case errors.Is(err, store.ErrClosed):
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		kind = store.ErrTimeout
	case errors.As(err, &se):
		switch {
		case se.Code == http.StatusConflict:
			kind = conflictKind(se.Body)
		case se.Code == http.StatusForbidden || se.Code == http.StatusUnauthorized || denied(se.Body):
			kind = store.ErrDenied
		case se.Code == http.StatusTooManyRequests || se.Code >= 500:
			// No cluster leader, a server that cannot reach the leader
			// (it died), rate limited and the like: the agent answers,
			// the cluster cannot serve for now (store.WithFailover
			// retries).
			err = store.Interrupted(err)
		default:
			// Permission denied, value too large and the like.
			kind = store.ErrInvalid
		}
	}
	return store.Fail(ctx, op, key, s.endpoint, kind, err)
}

// conflictKind tells a transaction whose condition failed (ErrConflict)
// from one the ACLs refused (also answered 409 by /v1/txn).
func conflictKind(body string) error {
	if denied(body) {
		return store.ErrDenied
	}
	return store.ErrConflict
}

// denied reports whether Consul's answer is an ACL refusal.
func denied(body string) bool {
	return strings.Contains(body, "Permission denied") || strings.Contains(body, "ACL not found")
}

func (s *Store) query(ctx context.Context) *api.QueryOptions {
	return (&api.QueryOptions{}).WithContext(ctx)
}

func (s *Store) write(ctx context.Context) *api.WriteOptions {
	return (&api.WriteOptions{}).WithContext(ctx)
}

// kvs turns Consul's answer into sorted store KVs, skipping keys that are
// not valid store keys (such as "dir/" folder keys written by other tools).
func (s *Store) kvs(pairs api.KVPairs) []store.KV {
	out := make([]store.KV, 0, len(pairs))
	for _, p := range pairs {
		key := strings.TrimPrefix(p.Key, s.root)
		if store.ValidKey(key) != nil {
			continue
		}
		out = append(out, store.KV{Key: key, Value: p.Value, Version: int64(p.ModifyIndex)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}

// Get returns one key.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := store.ValidKey(key); err != nil {
		return store.KV{}, store.Fail(ctx, "get", key, s.endpoint, store.ErrInvalid, err)
	}
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	var pair *api.KVPair
	err := s.do(ctx, func(c *api.Client) error {
		var err error
		pair, _, err = c.KV().Get(s.full(key), s.query(ctx))
		return err
	})
	if err != nil {
		return store.KV{}, s.fail(ctx, "get", key, err)
	}
	if pair == nil {
		return store.KV{}, store.Fail(ctx, "get", key, s.endpoint, store.ErrNotFound, nil)
	}
	return store.KV{Key: key, Value: pair.Value, Version: int64(pair.ModifyIndex)}, nil
}

// List returns every key below dir, sorted.
func (s *Store) List(ctx context.Context, dir string) ([]store.KV, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, store.Fail(ctx, "list", dir, s.endpoint, store.ErrInvalid, err)
	}
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	var pairs api.KVPairs
	err := s.do(ctx, func(c *api.Client) error {
		var err error
		pairs, _, err = c.KV().List(s.full(dir)+"/", s.query(ctx))
		return err
	})
	if err != nil {
		return nil, s.fail(ctx, "list", dir, err)
	}
	return s.kvs(pairs), nil
}

// Put writes key unconditionally.
func (s *Store) Put(ctx context.Context, key string, value []byte) (int64, error) {
	if err := store.ValidKey(key); err != nil {
		return 0, store.Fail(ctx, "put", key, s.endpoint, store.ErrInvalid, err)
	}
	return s.apply(ctx, "put", store.Put(key, value))
}

// Delete removes key; a missing key is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := store.ValidKey(key); err != nil {
		return store.Fail(ctx, "delete", key, s.endpoint, store.ErrInvalid, err)
	}
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	err := s.do(ctx, func(c *api.Client) error {
		_, err := c.KV().Delete(s.full(key), s.write(ctx))
		return err
	})
	if err != nil {
		return s.fail(ctx, "delete", key, err)
	}
	return nil
}

// CompareAndSwap writes key if it is still at version (0: absent).
func (s *Store) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	if err := store.CheckCAS(key, version); err != nil {
		return 0, store.Fail(ctx, "cas", key, s.endpoint, store.ErrInvalid, err)
	}
	op := store.Create(key, value)
	if version > 0 {
		op = store.Update(key, value, version)
	}
	return s.apply(ctx, "cas", op)
}

// apply runs one writing operation and returns the key's new version.
func (s *Store) apply(ctx context.Context, name string, op store.Op) (int64, error) {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	resp, err := s.txn(ctx, name, []store.Op{op})
	if err != nil {
		return 0, err
	}
	for _, r := range resp.Results {
		if r != nil && r.KV != nil && r.KV.Key == s.full(op.Key) {
			return int64(r.KV.ModifyIndex), nil
		}
	}
	return 0, store.Fail(ctx, name, op.Key, s.endpoint, store.ErrUnavailable,
		errors.New("consul transaction answered without the written key"))
}

// Txn applies ops in one Consul transaction.
func (s *Store) Txn(ctx context.Context, ops ...store.Op) error {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	_, err := s.txn(ctx, "txn", ops)
	return err
}

// txn translates ops into Consul transaction operations and runs them.
// A failed condition is ErrConflict naming the key whose condition failed.
func (s *Store) txn(ctx context.Context, name string, ops []store.Op) (*api.TxnResponse, error) {
	if err := store.CheckOps(ops); err != nil {
		key := ""
		if len(ops) > 0 {
			key = ops[0].Key
		}
		return nil, store.Fail(ctx, name, key, s.endpoint, store.ErrInvalid, err)
	}
	var txn api.TxnOps
	var owners []string // the store key of each Consul operation
	add := func(key string, kv api.KVTxnOp) {
		kv.Key = s.full(key)
		txn = append(txn, &api.TxnOp{KV: &kv})
		owners = append(owners, key)
	}
	for _, op := range ops {
		switch op.Kind {
		case store.OpCreate:
			add(op.Key, api.KVTxnOp{Verb: api.KVCAS, Value: op.Value, Index: 0})
		case store.OpUpdate:
			add(op.Key, api.KVTxnOp{Verb: api.KVCAS, Value: op.Value, Index: uint64(op.Version)})
		case store.OpDelete:
			// Consul's delete-cas succeeds on a missing key; check-index
			// does not.
			add(op.Key, api.KVTxnOp{Verb: api.KVCheckIndex, Index: uint64(op.Version)})
			add(op.Key, api.KVTxnOp{Verb: api.KVDelete})
		case store.OpPut:
			add(op.Key, api.KVTxnOp{Verb: api.KVSet, Value: op.Value})
		}
	}
	var resp api.TxnResponse
	err := s.do(ctx, func(c *api.Client) error {
		resp = api.TxnResponse{}
		_, err := c.Raw().Write("/v1/txn", txn, &resp, s.write(ctx))
		return err
	})
	if err != nil {
		key := ops[0].Key
		var se api.StatusError
		if errors.As(err, &se) && se.Code == http.StatusConflict {
			var failed api.TxnResponse
			if json.Unmarshal([]byte(se.Body), &failed) == nil && len(failed.Errors) > 0 {
				e := failed.Errors[0]
				if e.OpIndex >= 0 && e.OpIndex < len(owners) {
					key = owners[e.OpIndex]
				}
				err = fmt.Errorf("transaction rolled back: %s", e.What)
				return nil, store.Fail(ctx, name, key, s.endpoint, conflictKind(e.What), err)
			}
		}
		return nil, s.fail(ctx, name, key, err)
	}
	return &resp, nil
}

// logger is where this backend reports trouble it handles by itself.
func (s *Store) logger() *slog.Logger {
	return slog.Default().With("store", s.endpoint)
}

var _ store.Store = (*Store)(nil)
