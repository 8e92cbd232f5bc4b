package kvserver

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"time"
)

// Etcd returns a single-member etcd (the program bin) on two free ports of
// o.IP, with its data in dir, not yet started: Start waits until it is
// healthy, Stop and Start restart it with the same data and ports. Apart
// from the addresses, etcd runs with its defaults (fsync on).
func Etcd(bin, dir string, o Options) (*Server, error) {
	ip := o.Host()
	clientPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	peerPort := clientPort
	for peerPort == clientPort {
		if peerPort, err = FreePort(); err != nil {
			return nil, err
		}
	}
	clientURL := "http://" + net.JoinHostPort(ip, strconv.Itoa(clientPort))
	peerURL := "http://" + net.JoinHostPort(ip, strconv.Itoa(peerPort))
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
	return &Server{
		Process: &Process{
			Name:  "etcd",
			Args:  o.Command(args),
			Dir:   dir,
			Ready: EtcdReady(clientURL),
		},
		Scheme: "etcd",
		Addr:   net.JoinHostPort(ip, strconv.Itoa(clientPort)),
	}, nil
}

// EtcdReady succeeds once etcd's /health endpoint at clientURL reports a
// healthy member (it has a leader and serves requests), not merely an
// open port.
func EtcdReady(clientURL string) func() error {
	return EtcdHealthy(&http.Client{Timeout: 500 * time.Millisecond}, clientURL)
}

// EtcdHealthy is EtcdReady through hc (which may dial in a namespace).
func EtcdHealthy(hc *http.Client, clientURL string) func() error {
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
