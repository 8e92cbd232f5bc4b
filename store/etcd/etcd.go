// Package etcd is the store backed by an etcd v3 cluster.
//
// Keys live under "/<prefix>/" (the prefix comes from the URL
// etcd://h1:2379,h2:2379/prefix). A key's version is its etcd ModRevision;
// compare-and-swap and transactions are etcd transactions comparing
// ModRevision (or CreateRevision == 0 for "must not exist"). Directories
// are read in pages at one revision. Watches follow etcd's revision stream,
// resume it from the last revision seen after an outage, and re-read the
// directory only when etcd no longer has that history (compaction).
// Registrations are keys attached to a lease kept alive by this client.
//
// Open does not contact the server: the client connects on first use and
// reconnects by itself, so the plugin can start before its store is up.
package etcd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/dnplabs/docker-net-plugin/store"
)

const (
	// dialTimeout bounds connecting (and authenticating) to a server.
	dialTimeout = 2 * time.Second
	// maxReconnectDelay caps gRPC's reconnect backoff, so a server that
	// comes back is used again within seconds, however long it was away.
	maxReconnectDelay = 2 * time.Second
	// releaseTimeout bounds revoking a lease when a registration ends
	// with its context or with Close.
	releaseTimeout = 2 * time.Second
	// healthyRun is how long a watch stream or a lease keepalive must have
	// worked for the next failure to be retried quickly again.
	healthyRun = 10 * time.Second
	// connectWait bounds how long a call waits for a connection to a
	// server, whatever its own deadline: past it the store counts as
	// unreachable (ErrUnavailable). A plugin call then fails within
	// seconds while the store is down instead of holding dockerd up,
	// while a server that restarts (reconnect backoff is at most
	// maxReconnectDelay) goes unnoticed.
	connectWait = 3 * time.Second
)

// Store is a store.Store on an etcd v3 cluster.
type Store struct {
	endpoint string // etcd://h1:2379,h2:2379/prefix, for messages
	root     string // "/prefix/" (or "/"): what every key is put under
	cfg      clientv3.Config
	auth     *tokenAuth // nil without a username

	life store.Lifecycle // running watches and registrations

	mu  sync.Mutex
	cli *clientv3.Client // nil until first use
}

// Open returns the etcd store named by cfg.URL. It checks the URL and TLS
// files but does not wait for a server: calls made while none answers fail
// with ErrUnavailable or ErrTimeout, and work once one does.
func Open(ctx context.Context, cfg store.Config) (store.Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid, err)
	}
	if loc.Scheme != "etcd" {
		return nil, store.Fail(ctx, "open", "", cfg.URL, store.ErrInvalid,
			fmt.Errorf("etcd store given a %q URL", loc.Scheme))
	}
	endpoint := "etcd://" + strings.Join(loc.Hosts, ",") + "/" + loc.Prefix
	tlsCfg, err := tlsConfig(cfg)
	if err != nil {
		return nil, store.Fail(ctx, "open", "", endpoint, store.ErrInvalid, err)
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, store.Fail(ctx, "open", "", endpoint, store.ErrInvalid,
			errors.New("etcd authentication needs both a username and a password"))
	}
	scheme := "http://"
	if tlsCfg != nil {
		scheme = "https://"
	}
	var endpoints []string
	for _, h := range loc.Hosts {
		endpoints = append(endpoints, scheme+h)
	}
	root := "/"
	if loc.Prefix != "" {
		root = "/" + loc.Prefix + "/"
	}
	s := &Store{
		endpoint: endpoint,
		root:     root,
		cfg: clientv3.Config{
			Endpoints:   endpoints,
			DialTimeout: dialTimeout,
			// Notice a dead connection (no answer to pings) while a watch
			// or keepalive stream is open. etcd refuses pings more often
			// than every 5s.
			DialKeepAliveTime:    10 * time.Second,
			DialKeepAliveTimeout: 3 * time.Second,
			TLS:                  tlsCfg,
			Logger:               zap.NewNop(),
			DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
				Backoff: backoff.Config{
					BaseDelay:  250 * time.Millisecond,
					Multiplier: 1.6,
					Jitter:     0.2,
					MaxDelay:   maxReconnectDelay,
				},
				MinConnectTimeout: dialTimeout,
			})},
		},
	}
	if cfg.Username != "" {
		s.auth = &tokenAuth{user: cfg.Username, password: cfg.Password}
		s.cfg.DialOptions = append(s.cfg.DialOptions, s.auth.dialOptions()...)
	}
	return s, nil
}

// tlsConfig builds the client TLS settings from the CA, certificate and
// key files, or returns nil when none is set.
func tlsConfig(cfg store.Config) (*tls.Config, error) {
	if cfg.CAFile == "" && cfg.CertFile == "" && cfg.KeyFile == "" {
		return nil, nil
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("read CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("CA file %s holds no PEM certificate", cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	if (cfg.CertFile == "") != (cfg.KeyFile == "") {
		return nil, errors.New("a client certificate needs both the certificate and the key file")
	}
	if cfg.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("load client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// Endpoint names the servers and the prefix.
func (s *Store) Endpoint() string { return s.endpoint }

// Close ends the watches and registrations (revoking their leases) and
// releases the client. The watch channels are closed when it returns.
func (s *Store) Close() error {
	if !s.life.Close() {
		return nil
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cli == nil {
		return nil
	}
	err := s.cli.Close()
	s.cli = nil
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("close etcd client for %s: %w", s.endpoint, err)
	}
	return nil
}

// client returns the etcd client, creating it on first use. That does
// not contact the server: the connection (and the login, with a username)
// happen with the first request.
func (s *Store) client() (*clientv3.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.life.Closed() {
		return nil, store.ErrClosed
	}
	if s.cli != nil {
		return s.cli, nil
	}
	cli, err := clientv3.New(s.cfg)
	if err != nil {
		return nil, fmt.Errorf("create etcd client: %w", err)
	}
	if s.auth != nil {
		s.auth.setClient(cli)
	}
	s.cli = cli
	return cli, nil
}

// clientForRelease returns the client even while Close runs, so that
// registrations can revoke their leases on the way out.
func (s *Store) clientForRelease() (*clientv3.Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cli == nil {
		return nil, store.ErrClosed
	}
	return s.cli, nil
}

// full is the etcd key of a store key.
func (s *Store) full(key string) string { return s.root + key }

// rel is the store key of an etcd key.
func (s *Store) rel(k []byte) string { return strings.TrimPrefix(string(k), s.root) }

// fail turns an etcd client error into a *store.Error of the right kind.
func (s *Store) fail(ctx context.Context, op, key string, err error) error {
	kind := store.ErrUnavailable
	switch {
	case errors.Is(err, errNoConnection):
		if why := s.tlsRefusal(); why != nil {
			// Not an outage: the server refuses this client's certificate.
			kind, err = store.ErrDenied, why
		}
	case errors.Is(err, store.ErrClosed):
	case isAuthErr(err):
		// Wrong or missing credentials: the store is unusable as configured.
		kind = store.ErrDenied
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		kind = store.ErrTimeout
	default:
		switch errCode(err) {
		case codes.Unauthenticated, codes.PermissionDenied:
			// Wrong credentials or missing rights.
			kind = store.ErrDenied
		case codes.DeadlineExceeded, codes.Canceled:
			kind = store.ErrTimeout
		case codes.InvalidArgument, codes.FailedPrecondition, codes.OutOfRange:
			// Too many operations, request too large and the like.
			kind = store.ErrInvalid
		case codes.Unavailable:
			// A member answered "no leader" or "request timed out" (it
			// forwarded the request to a leader that died), or the
			// member itself went away mid-request: a failover, which
			// store.WithFailover rides through. (No connection at all
			// is errNoConnection above.)
			err = store.Interrupted(err)
		}
	}
	if kind == store.ErrTimeout && !errors.Is(err, context.Canceled) {
		if st := s.connState(); st != connectivity.Ready {
			err = fmt.Errorf("no connection to etcd (%s): %w", st, err)
		}
	}
	return store.Fail(ctx, op, key, s.endpoint, kind, err)
}

func isAuthErr(err error) bool {
	for _, e := range []error{rpctypes.ErrAuthFailed, rpctypes.ErrUserEmpty, rpctypes.ErrPermissionDenied,
		rpctypes.ErrInvalidAuthToken, rpctypes.ErrAuthOldRevision, rpctypes.ErrUserNotFound} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// errCode is the gRPC code of an etcd client error.
func errCode(err error) codes.Code {
	var ee rpctypes.EtcdError
	if errors.As(err, &ee) {
		return ee.Code()
	}
	return status.Code(err)
}

// connState reports the client connection's state, to explain timeouts.
func (s *Store) connState() connectivity.State {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cli == nil {
		return connectivity.Idle
	}
	return s.cli.ActiveConnection().GetState()
}

// do runs one bounded call against the client.
func (s *Store) do(ctx context.Context, op, key string, fn func(ctx context.Context, cli *clientv3.Client) error) error {
	ctx, cancel := store.WithTimeout(ctx)
	defer cancel()
	cli, err := s.client()
	if err != nil {
		return s.fail(ctx, op, key, err)
	}
	if err := awaitConn(ctx, cli); err != nil {
		return s.fail(ctx, op, key, err)
	}
	if err := fn(ctx, cli); err != nil {
		return s.fail(ctx, op, key, err)
	}
	return nil
}

var errNoConnection = errors.New("no connection to any etcd server")

// tlsRefusal explains a missing connection when TLS is configured: it
// tries one TLS handshake with each server and returns the error of one that
// answered but refused this client (an untrusted or missing certificate),
// or nil when none did (the servers are down or unreachable).
func (s *Store) tlsRefusal() error {
	if s.cfg.TLS == nil {
		return nil
	}
	for _, ep := range s.cfg.Endpoints {
		host := strings.TrimPrefix(ep, "https://")
		d := &net.Dialer{Timeout: time.Second}
		conn, err := tls.DialWithDialer(d, "tcp", host, s.cfg.TLS.Clone())
		if err == nil {
			// With TLS 1.3 the server judges the client certificate after
			// the handshake: its verdict arrives with the first read.
			conn.SetReadDeadline(time.Now().Add(time.Second))
			_, err = conn.Read(make([]byte, 1))
			conn.Close()
		}
		var opErr *net.OpError
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &opErr) && opErr.Op == "dial") {
			continue // accepted us, or not there at all
		}
		if msg := err.Error(); strings.Contains(msg, "tls:") || strings.Contains(msg, "x509:") || strings.Contains(msg, "certificate") {
			return fmt.Errorf("TLS with %s refused: %w", host, err)
		}
	}
	return nil
}

// awaitConn waits until the client is connected to a server. If it is not
// within connectWait, or by shortly before ctx's deadline, it gives up with
// errNoConnection, so the caller can tell "store unreachable"
// (ErrUnavailable) from "store too slow" (ErrTimeout).
func awaitConn(ctx context.Context, cli *clientv3.Client) error {
	conn := cli.ActiveConnection()
	st := conn.GetState()
	if st == connectivity.Ready {
		return nil
	}
	dl, ok := ctx.Deadline()
	if !ok || ctx.Err() != nil {
		return nil // let the call itself report
	}
	margin := min(time.Until(dl)/10, 250*time.Millisecond)
	wait := min(time.Until(dl)-margin, connectWait)
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for st != connectivity.Ready {
		if st == connectivity.Shutdown {
			return store.ErrClosed
		}
		if st == connectivity.Idle {
			conn.Connect()
		}
		if !conn.WaitForStateChange(wctx, st) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("%w (gRPC connection %s)", errNoConnection, st)
		}
		st = conn.GetState()
	}
	return nil
}

// Get returns one key.
func (s *Store) Get(ctx context.Context, key string) (store.KV, error) {
	if err := store.ValidKey(key); err != nil {
		return store.KV{}, store.Fail(ctx, "get", key, s.endpoint, store.ErrInvalid, err)
	}
	var resp *clientv3.GetResponse
	err := s.do(ctx, "get", key, func(ctx context.Context, cli *clientv3.Client) error {
		var err error
		resp, err = cli.Get(ctx, s.full(key))
		return err
	})
	if err != nil {
		return store.KV{}, err
	}
	if len(resp.Kvs) == 0 {
		return store.KV{}, store.Fail(ctx, "get", key, s.endpoint, store.ErrNotFound, nil)
	}
	kv := resp.Kvs[0]
	return store.KV{Key: key, Value: kv.Value, Version: kv.ModRevision}, nil
}

// List returns every key below dir, sorted.
func (s *Store) List(ctx context.Context, dir string) ([]store.KV, error) {
	if err := store.ValidKey(dir); err != nil {
		return nil, store.Fail(ctx, "list", dir, s.endpoint, store.ErrInvalid, err)
	}
	var out []store.KV
	err := s.do(ctx, "list", dir, func(ctx context.Context, cli *clientv3.Client) error {
		var err error
		out, _, err = s.list(ctx, cli, dir)
		return err
	})
	return out, err
}

// listPage is how many keys one range request of a List (or of a watch's
// snapshot) returns: a directory of 100,000 records of 200 bytes is read in
// 20 answers of about 1.5 MB instead of one of 30 MB. Smaller pages cost
// more than they save: etcd walks its index over the whole rest of the
// range for every page (to count it), so the time grows with the number
// of pages (100,000 keys: about 2.5 s in pages of 1,000, 1 s in pages of
// 5,000, on a loaded 2-core machine).
const listPage = 5000

// listAttempts bounds how often list starts over when the revision its
// first page was read at is compacted before the last page is read.
const listAttempts = 3

// list reads dir and returns its content, sorted by key, and the revision
// it was read at. It reads in pages of listPage keys, every page at the
// revision of the first one, so the result is one consistent view however
// many requests it takes.
func (s *Store) list(ctx context.Context, cli *clientv3.Client, dir string) ([]store.KV, int64, error) {
	var err error
	for range listAttempts {
		var out []store.KV
		var rev int64
		out, rev, err = s.listAt(ctx, cli, dir)
		if err == nil {
			return out, rev, nil
		}
		if !errors.Is(err, rpctypes.ErrCompacted) {
			return nil, 0, err
		}
	}
	return nil, 0, fmt.Errorf("the directory kept being compacted while it was read: %w", err)
}

// listAt is one attempt of list.
func (s *Store) listAt(ctx context.Context, cli *clientv3.Client, dir string) ([]store.KV, int64, error) {
	prefix := s.full(dir) + "/"
	end := clientv3.GetPrefixRangeEnd(prefix)
	from := prefix
	var out []store.KV
	var rev int64
	for {
		// etcd returns a range sorted by key; asking for that order
		// explicitly would make it read the whole range before the limit.
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(listPage)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctx, from, opts...)
		if err != nil {
			return nil, 0, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
			out = make([]store.KV, 0, resp.Count)
		}
		for _, kv := range resp.Kvs {
			out = append(out, store.KV{Key: s.rel(kv.Key), Value: kv.Value, Version: kv.ModRevision})
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, rev, nil
		}
		// The next page starts right after the last key of this one.
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// Put writes key unconditionally.
func (s *Store) Put(ctx context.Context, key string, value []byte) (int64, error) {
	if err := store.ValidKey(key); err != nil {
		return 0, store.Fail(ctx, "put", key, s.endpoint, store.ErrInvalid, err)
	}
	var rev int64
	err := s.do(ctx, "put", key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Put(ctx, s.full(key), string(value))
		if err != nil {
			return err
		}
		rev = resp.Header.Revision
		return nil
	})
	return rev, err
}

// Delete removes key; a missing key is not an error.
func (s *Store) Delete(ctx context.Context, key string) error {
	if err := store.ValidKey(key); err != nil {
		return store.Fail(ctx, "delete", key, s.endpoint, store.ErrInvalid, err)
	}
	return s.do(ctx, "delete", key, func(ctx context.Context, cli *clientv3.Client) error {
		_, err := cli.Delete(ctx, s.full(key))
		return err
	})
}

// CompareAndSwap writes key if it is still at version (0: absent).
func (s *Store) CompareAndSwap(ctx context.Context, key string, value []byte, version int64) (int64, error) {
	if err := store.CheckCAS(key, version); err != nil {
		return 0, store.Fail(ctx, "cas", key, s.endpoint, store.ErrInvalid, err)
	}
	cmp := clientv3.Compare(clientv3.ModRevision(s.full(key)), "=", version)
	if version == 0 {
		cmp = clientv3.Compare(clientv3.CreateRevision(s.full(key)), "=", 0)
	}
	var rev int64
	var ok bool
	err := s.do(ctx, "cas", key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Txn(ctx).If(cmp).Then(clientv3.OpPut(s.full(key), string(value))).Commit()
		if err != nil {
			return err
		}
		rev, ok = resp.Header.Revision, resp.Succeeded
		return nil
	})
	if err != nil {
		return 0, err
	}
	if !ok {
		return 0, store.Fail(ctx, "cas", key, s.endpoint, store.ErrConflict,
			fmt.Errorf("key is not at version %d", version))
	}
	return rev, nil
}

// Txn applies ops in one etcd transaction: all conditions in If, all
// writes in Then.
func (s *Store) Txn(ctx context.Context, ops ...store.Op) error {
	if err := store.CheckOps(ops); err != nil {
		return store.Fail(ctx, "txn", "", s.endpoint, store.ErrInvalid, err)
	}
	var cmps []clientv3.Cmp
	var writes []clientv3.Op
	for _, op := range ops {
		k := s.full(op.Key)
		switch op.Kind {
		case store.OpCreate:
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(k), "=", 0))
			writes = append(writes, clientv3.OpPut(k, string(op.Value)))
		case store.OpUpdate:
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", op.Version))
			writes = append(writes, clientv3.OpPut(k, string(op.Value)))
		case store.OpDelete:
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(k), "=", op.Version))
			writes = append(writes, clientv3.OpDelete(k))
		case store.OpPut:
			writes = append(writes, clientv3.OpPut(k, string(op.Value)))
		}
	}
	var ok bool
	err := s.do(ctx, "txn", ops[0].Key, func(ctx context.Context, cli *clientv3.Client) error {
		resp, err := cli.Txn(ctx).If(cmps...).Then(writes...).Commit()
		if err != nil {
			return err
		}
		ok = resp.Succeeded
		return nil
	})
	if err != nil {
		return err
	}
	if !ok {
		return store.Fail(ctx, "txn", ops[0].Key, s.endpoint, store.ErrConflict,
			errors.New("a condition of the transaction failed"))
	}
	return nil
}

var _ store.Store = (*Store)(nil)

// logger is where this backend reports trouble it handles by itself.
func (s *Store) logger() *slog.Logger {
	return slog.Default().With("store", s.endpoint)
}
