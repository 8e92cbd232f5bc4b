package testenv

import (
	"testing"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// StartEtcd runs a single-member etcd (/usr/bin/etcd) on two free ports of
// o.IP, with its data in a temporary directory, and stops it when the test
// ends. Stop and Start on the returned server restart it with the same data
// and ports. Apart from the addresses, etcd runs with its defaults (fsync on).
func StartEtcd(t testing.TB, o ServerOptions) *Server {
	t.Helper()
	bin := LookPath(t, "etcd", "/usr/bin")
	ks, err := kvserver.Etcd(bin, t.TempDir(), o)
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{Process: &Process{ks.Process}, Scheme: ks.Scheme, Addr: ks.Addr}
	t.Cleanup(func() { srv.Stop(t) })
	srv.Start(t)
	return srv
}
