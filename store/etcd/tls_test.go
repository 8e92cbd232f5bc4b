package etcd_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
)

// The CA and client certificate files are used: with them the store works
// over TLS, without a client certificate the server refuses it.
func TestTLS(t *testing.T) {
	srv, files := testenv.StartEtcdTLS(t)
	s := open(t, store.Config{URL: srv.URL("tls"), CAFile: files.CA, CertFile: files.ClientCert, KeyFile: files.ClientKey})
	ctx := ctxT(t, 30*time.Second)
	v, err := s.CompareAndSwap(ctx, "k", []byte("over tls"), 0)
	if err != nil {
		t.Fatalf("cas over TLS: %v", err)
	}
	if kv, err := s.Get(ctx, "k"); err != nil || kv.Version != v || string(kv.Value) != "over tls" {
		t.Fatalf("get over TLS: %+v, %v", kv, err)
	}
	ch, err := s.Watch(ctx, "d")
	if err != nil {
		t.Fatal(err)
	}
	if ev := next(t, ch, 10*time.Second); ev.Type != store.EventReset {
		t.Fatalf("first watch event over TLS: %+v", ev)
	}

	noCert := open(t, store.Config{URL: srv.URL("tls"), CAFile: files.CA})
	gctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = noCert.Get(gctx, "k")
	if !errors.Is(err, store.ErrDenied) || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("get without a client certificate: %v, want access denied, naming the certificate", err)
	}
}
