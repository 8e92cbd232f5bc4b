package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// StartEtcd runs a single-member etcd (/usr/bin/etcd) on two free ports of
// o.IP, with its data in a temporary directory, and stops it when the test
// ends. Stop and Start on the returned server restart it with the same data
// and ports. Apart from the addresses, etcd runs with its defaults (fsync on).
func StartEtcd(t testing.TB, o ServerOptions) *Server {
	t.Helper()
	bin := LookPath(t, "etcd", "/usr/bin")
	ip := o.ip()
	clientPort := FreePort(t)
	peerPort := FreePort(t)
	for peerPort == clientPort {
		peerPort = FreePort(t)
	}
	clientURL := "http://" + net.JoinHostPort(ip, strconv.Itoa(clientPort))
	peerURL := "http://" + net.JoinHostPort(ip, strconv.Itoa(peerPort))
	dir := t.TempDir()

	args := []string{bin,
		"--name", "test",
		"--data-dir", filepath.Join(dir, "data"),
		"--listen-client-urls", clientURL,
		"--advertise-client-urls", clientURL,
		"--listen-peer-urls", peerURL,
		"--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "test=" + peerURL,
		"--initial-cluster-state", "new",
		"--logger", "zap",
		"--log-outputs", "stderr",
	}
	srv := &Server{
		Process: &Process{
			Name:  "etcd",
			Args:  o.wrap(args),
			Dir:   dir,
			Ready: etcdReady(clientURL),
		},
		Scheme: "etcd",
		Addr:   net.JoinHostPort(ip, strconv.Itoa(clientPort)),
	}
	t.Cleanup(func() { srv.Stop(t) })
	srv.Start(t)
	return srv
}

// etcdReady succeeds once etcd's /health endpoint reports a healthy member
// (it has a leader and serves requests), not merely an open port.
func etcdReady(clientURL string) func() error {
	hc := &http.Client{Timeout: 500 * time.Millisecond}
	return func() error {
		resp, err := hc.Get(clientURL + "/health")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if err != nil {
			return fmt.Errorf("read /health: %w", err)
		}
		var h struct {
			Health string `json:"health"`
		}
		if err := json.Unmarshal(body, &h); err != nil {
			return fmt.Errorf("/health answered %s %q: %w", resp.Status, body, err)
		}
		if h.Health != "true" {
			return fmt.Errorf("/health answered %s %q", resp.Status, body)
		}
		return nil
	}
}
