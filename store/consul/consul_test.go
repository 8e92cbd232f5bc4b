package consul_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/consul"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
)

func TestMain(m *testing.M) { storetest.Main(m, consul.Open) }

// liveTTL is the shortest TTL Consul accepts for a session with its
// default settings (session_ttl_min).
const liveTTL = 10 * time.Second

func TestConformance(t *testing.T) {
	t.Parallel() // with TestRegisterRenews, which mostly sleeps
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	b := storetest.OnServer("consul", consul.Open, srv)
	b.Partitioned = storetest.Partition(consul.Open, srv.Scheme, srv.Addr)
	// Consul invalidates a session up to twice its TTL after the last
	// renewal, and a 10s ttl cannot be halved below Consul's minimum.
	b.LiveTTL, b.LiveExpiry = liveTTL, 2*liveTTL+5*time.Second
	storetest.Run(t, b)
}

func open(t testing.TB, cfg store.Config) store.Store { return storetest.Open(t, consul.Open, cfg) }

func ctxT(t testing.TB, d time.Duration) context.Context { return testenv.Context(t, d) }

// rawClient is a plain Consul client for doing what an operator (or
// another process) would do behind the store's back.
func rawClient(t testing.TB, srv *testenv.Server) *api.Client {
	t.Helper()
	c, err := api.NewClient(&api.Config{Address: srv.Addr, Scheme: "http"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// deadAddr is a loopback address where nothing listens.
func deadAddr(t testing.TB) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(testenv.FreePort(t)))
}

// The session is renewed: the key outlives twice the session TTL (the
// longest Consul keeps a session nobody renews), still held by the same
// session. (The conformance suite's check waits only 1.5 times the TTL.)
func TestRegisterRenews(t *testing.T) {
	t.Parallel()
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("renew")})
	ctx := ctxT(t, time.Minute)
	if _, err := s.Register(ctx, "hosts/me", []byte("alive"), liveTTL); err != nil {
		t.Fatal(err)
	}
	raw := rawClient(t, srv)
	before, _, err := raw.KV().Get("renew/hosts/me", nil)
	if err != nil || before == nil || before.Session == "" {
		t.Fatalf("registered key in Consul: %+v, %v; want it held by a session", before, err)
	}
	// liveTTL is below 2 x Consul's minimum, so the session TTL is liveTTL.
	time.Sleep(2*liveTTL + 3*time.Second)
	after, _, err := raw.KV().Get("renew/hosts/me", nil)
	if err != nil || after == nil || after.Session != before.Session {
		t.Fatalf("key after %s: %+v, %v; want it still held by session %s", 2*liveTTL+3*time.Second, after, err, before.Session)
	}
}

// A registration whose session is destroyed behind its back (as when the
// store was unreachable for longer than the TTL) writes its key again.
func TestRegisterSessionLost(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: srv.URL("lost")})
	ctx := ctxT(t, time.Minute)
	if _, err := s.Register(ctx, "hosts/me", []byte("alive"), liveTTL); err != nil {
		t.Fatal(err)
	}
	raw := rawClient(t, srv)
	pair, _, err := raw.KV().Get("lost/hosts/me", nil)
	if err != nil || pair == nil || pair.Session == "" {
		t.Fatalf("registered key in Consul: %+v, %v; want it held by a session", pair, err)
	}
	if _, err := raw.Session().Destroy(pair.Session, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, "hosts/me"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("key after its session was destroyed: %v, want not found", err)
	}
	deadline := time.Now().Add(2 * liveTTL)
	for {
		kv, err := s.Get(ctx, "hosts/me")
		if err == nil && string(kv.Value) == "alive" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key not written again %s after its session was lost: %v", 2*liveTTL, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// A key still held by the session of a previous, killed owner (whose TTL
// has not run out yet) is taken over by a new Register, and the old
// session ending later does not delete it.
func TestRegisterTakesOverStaleKey(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	raw := rawClient(t, srv)
	old, _, err := raw.Session().CreateNoChecks(&api.SessionEntry{
		TTL: "60s", Behavior: api.SessionBehaviorDelete, LockDelay: 15 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	ok, _, err := raw.KV().Acquire(&api.KVPair{Key: "stale/hosts/me", Value: []byte("old"), Session: old}, nil)
	if err != nil || !ok {
		t.Fatalf("acquire with the old session: %v, %v", ok, err)
	}

	s := open(t, store.Config{URL: srv.URL("stale")})
	ctx := ctxT(t, time.Minute)
	if _, err := s.Register(ctx, "hosts/me", []byte("new"), liveTTL); err != nil {
		t.Fatalf("register over a stale key: %v", err)
	}
	if kv, err := s.Get(ctx, "hosts/me"); err != nil || string(kv.Value) != "new" {
		t.Fatalf("key after register: %+v, %v; want value new", kv, err)
	}
	if _, err := raw.Session().Destroy(old, nil); err != nil {
		t.Fatal(err)
	}
	if kv, err := s.Get(ctx, "hosts/me"); err != nil || string(kv.Value) != "new" {
		t.Fatalf("key after the old session ended: %+v, %v; want value new", kv, err)
	}
}

// Open does not need a server; calls to one that is not there fail fast
// with ErrUnavailable naming it.
func TestNoServer(t *testing.T) {
	addr := deadAddr(t)
	s := open(t, store.Config{URL: "consul://" + addr + "/x"})
	ctx := ctxT(t, 10*time.Second)
	start := time.Now()
	_, err := s.Get(ctx, "k")
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("get without a server: %v, want store unavailable", err)
	}
	if !strings.Contains(err.Error(), addr) {
		t.Errorf("error %q does not name %s", err, addr)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("get without a server took %s", d)
	}
	_, err = s.Register(ctx, "live", []byte("x"), liveTTL)
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("register without a server: %v, want store unavailable", err)
	}
}

// With several servers in the URL, one that does not answer is skipped.
func TestSecondServer(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	s := open(t, store.Config{URL: "consul://" + deadAddr(t) + "," + srv.Addr + "/two"})
	ctx := ctxT(t, 30*time.Second)
	v, err := s.Put(ctx, "k", []byte("v"))
	if err != nil {
		t.Fatalf("put with the first server down: %v", err)
	}
	kv, err := s.Get(ctx, "k")
	if err != nil || kv.Version != v || string(kv.Value) != "v" {
		t.Fatalf("get: %+v, %v", kv, err)
	}
	ch, err := s.Watch(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-ch:
		if ev.Type != store.EventReset {
			t.Fatalf("first watch event %s, want reset", ev.Type)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no watch event with the first server down")
	}
}

// Bad URLs and unreadable TLS files are refused when the store is opened.
func TestOpenChecksConfig(t *testing.T) {
	for _, cfg := range []store.Config{
		{URL: "etcd://127.0.0.1:2379/x"},
		{URL: "consul://nohost/x"},
		{URL: "consul://127.0.0.1:8500/x", CAFile: "/nonexistent/ca.pem"},
		{URL: "consul://127.0.0.1:8500/x", CertFile: "/nonexistent/cert.pem"},
	} {
		if _, err := consul.Open(context.Background(), cfg); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("open %+v: %v, want invalid", cfg, err)
		}
	}
}

// The ACL token of the config is sent: with it writes work, without it
// Consul refuses them and the error says why.
func TestACLToken(t *testing.T) {
	const token = "6a1c2b7e-2f0d-4d4e-9b7a-0c1d2e3f4a5b"
	srv := testenv.StartConsulWith(t, testenv.ServerOptions{}, testenv.ConsulConfig{
		HCL:   []string{fmt.Sprintf(`acl { enabled = true, default_policy = "deny", tokens { initial_management = %q } }`, token)},
		Token: token,
	})
	ctx := ctxT(t, 30*time.Second)
	good := open(t, store.Config{URL: srv.URL("acl"), Token: token})
	if _, err := good.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatalf("put with the management token: %v", err)
	}
	if _, err := good.Register(ctx, "live", []byte("me"), liveTTL); err != nil {
		t.Fatalf("register with the management token: %v", err)
	}
	bad := open(t, store.Config{URL: srv.URL("acl")})
	_, err := bad.Put(ctx, "k", []byte("w"))
	if !errors.Is(err, store.ErrDenied) || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("put without a token: %v, want invalid request: permission denied", err)
	}
	if _, err := bad.Get(ctx, "k"); !errors.Is(err, store.ErrDenied) || !strings.Contains(err.Error(), "Permission denied") {
		t.Fatalf("get without a token: %v, want invalid request: permission denied", err)
	}
	if kv, err := good.Get(ctx, "k"); err != nil || string(kv.Value) != "v" {
		t.Fatalf("value after the refused put: %+v, %v", kv, err)
	}
}

// With CA, certificate and key files the store talks https to a Consul
// that requires client certificates.
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, dir, "ca", nil, nil)
	newCert(t, dir, "server", ca, caKey)
	newCert(t, dir, "client", ca, caKey)
	f := func(name string) string { return filepath.Join(dir, name) }
	srv := testenv.StartConsulWith(t, testenv.ServerOptions{}, testenv.ConsulConfig{
		HTTPS: true,
		HCL: []string{fmt.Sprintf(`tls {
			defaults { ca_file = %q, cert_file = %q, key_file = %q }
			https { verify_incoming = true }
		}`, f("ca.pem"), f("server.pem"), f("server-key.pem"))},
	})
	ctx := ctxT(t, 30*time.Second)
	s := open(t, store.Config{URL: srv.URL("tls"), CAFile: f("ca.pem"), CertFile: f("client.pem"), KeyFile: f("client-key.pem")})
	v, err := s.Put(ctx, "k", []byte("v"))
	if err != nil {
		t.Fatalf("put over https: %v", err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || kv.Version != v {
		t.Fatalf("get over https: %+v, %v", kv, err)
	}
	noCert := open(t, store.Config{URL: srv.URL("tls"), CAFile: f("ca.pem")})
	if _, err := noCert.Get(ctx, "k"); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("get without a client certificate: %v, want the server to refuse the connection", err)
	}
}

// newCert writes name.pem and name-key.pem into dir: a CA when parent is
// nil, else a certificate for 127.0.0.1 signed by parent.
func newCert(t testing.TB, dir, name string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		DNSNames:     []string{"localhost", "server.dc1.consul"},
	}
	signer, signerKey := tmpl, key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	} else {
		signer, signerKey = parent, parentKey
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(file, typ string, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, file), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(name+".pem", "CERTIFICATE", der)
	write(name+"-key.pem", "EC PRIVATE KEY", keyDER)
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

// After an operator restores an older snapshot, a watch ends up with the
// restored content.
func TestWatchAfterSnapshotRestore(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	raw := rawClient(t, srv)
	s := open(t, store.Config{URL: srv.URL("snap")})
	ctx := ctxT(t, time.Minute)
	if _, err := s.Put(ctx, "w/a", []byte("1")); err != nil {
		t.Fatal(err)
	}
	rc, _, err := raw.Snapshot().Save(nil)
	if err != nil {
		t.Fatal(err)
	}
	snap, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		if _, err := s.Put(ctx, fmt.Sprintf("w/later%d", i), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Put(ctx, "w/a", []byte("2")); err != nil {
		t.Fatal(err)
	}
	ch, err := s.Watch(ctx, "w")
	if err != nil {
		t.Fatal(err)
	}
	state := map[string]string{}
	waitState(t, ch, state, 10*time.Second, func() bool { return len(state) == 21 && state["w/a"] == "2" })

	if err := raw.Snapshot().Restore(nil, bytes.NewReader(snap)); err != nil {
		t.Fatalf("restore: %v", err)
	}
	waitState(t, ch, state, 15*time.Second, func() bool { return len(state) == 1 && state["w/a"] == "1" })
}

// waitState applies watch events to state until done reports true.
func waitState(t *testing.T, ch <-chan store.Event, state map[string]string, d time.Duration, done func() bool) {
	t.Helper()
	timeout := time.After(d)
	for !done() {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatal("watch channel closed")
			}
			switch ev.Type {
			case store.EventReset:
				clear(state)
				for _, kv := range ev.Snapshot {
					state[kv.Key] = string(kv.Value)
				}
			case store.EventPut:
				state[ev.KV.Key] = string(ev.KV.Value)
			case store.EventDelete:
				delete(state, ev.KV.Key)
			}
		case <-timeout:
			t.Fatalf("watch state after %s: %v", d, state)
		}
	}
}

// A registration ends with its context, and all of a client's
// registrations and watches end with Close.
func TestRegisterEndsWithContextAndClose(t *testing.T) {
	srv := testenv.StartConsul(t, testenv.ServerOptions{})
	other := open(t, store.Config{URL: srv.URL("end")})
	s, err := consul.Open(context.Background(), store.Config{URL: srv.URL("end")})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := ctxT(t, time.Minute)

	gone := func(key string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, err := other.Get(ctx, key)
			if errors.Is(err, store.ErrNotFound) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still there 5s after its registration ended: %v", key, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	rctx, cancel := context.WithCancel(ctx)
	if _, err := s.Register(rctx, "live/a", []byte("a"), liveTTL); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Register(ctx, "live/b", []byte("b"), liveTTL); err != nil {
		t.Fatal(err)
	}
	ch, err := s.Watch(ctx, "live")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	gone("live/a")
	if _, err := other.Get(ctx, "live/b"); err != nil {
		t.Fatalf("live/b after another registration ended: %v", err)
	}

	if err := s.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	gone("live/b")
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatal("watch channel still open 5s after Close")
		}
	}
}
