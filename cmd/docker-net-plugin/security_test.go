package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

// TestStoreCredentials runs the real `serve` against stores that demand
// credentials: etcd over TLS with client certificates the test made, Consul
// with an ACL token, ZooKeeper with digest auth. With the right credentials
// the plugin registers its host; with wrong ones it stops at start with an
// error that says the store refused it.
func TestStoreCredentials(t *testing.T) {
	testenv.NeedRoot(t)
	t.Run("etcd-tls", func(t *testing.T) {
		srv, files := testenv.StartEtcdTLS(t)
		other := testenv.WriteCerts(t, t.TempDir()) // a CA the server does not trust
		url := srv.URL("sec")
		good := []string{"--store", url, "--store-ca", files.CA, "--store-cert", files.ClientCert, "--store-key", files.ClientKey}
		check(t, store.Config{URL: url, CAFile: files.CA, CertFile: files.ClientCert, KeyFile: files.ClientKey}, good,
			[]string{"--store", url, "--store-ca", files.CA, "--store-cert", other.ClientCert, "--store-key", other.ClientKey})
	})
	t.Run("consul-acl", func(t *testing.T) {
		const token = "0b6f5c1e-8d2a-4c3b-9e7f-1a2b3c4d5e6f"
		srv := testenv.StartConsulWith(t, testenv.ServerOptions{}, testenv.ConsulConfig{
			HCL:   []string{fmt.Sprintf(`acl { enabled = true, default_policy = "deny", tokens { initial_management = %q } }`, token)},
			Token: token,
		})
		url := srv.URL("sec")
		check(t, store.Config{URL: url, Token: token}, []string{"--store", url, "--store-token-file", secret(t, token)},
			[]string{"--store", url, "--store-token-file", secret(t, "11111111-2222-3333-4444-555555555555")})
	})
	t.Run("zk-digest", func(t *testing.T) {
		srv := testenv.StartZooKeeperAuth(t, testenv.ServerOptions{})
		url := srv.URL("sec")
		good := []string{"--store", url, "--store-username", "alice", "--store-password-file", secret(t, "s3cret")}
		check(t, store.Config{URL: url, Username: "alice", Password: "s3cret"}, good,
			[]string{"--store", url, "--store-username", "alice", "--store-password-file", secret(t, "guess")},
			[]string{"--store", url})
	})
}

// secret writes a secret to a file of its own, as an operator would.
func secret(t *testing.T, s string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(path, []byte(s+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestNoSecretOnTheCommandLine: the store password and the Consul token
// are not accepted as flags (every user of the machine reads flags in the
// process list); the environment works, and the file flags' contents do.
func TestNoSecretOnTheCommandLine(t *testing.T) {
	for _, cmd := range []func([]string) error{
		func(a []string) error { return serve(context.Background(), a) },
		func(a []string) error { return status(context.Background(), io.Discard, a) },
		func(a []string) error { return doctor(context.Background(), io.Discard, a) },
	} {
		for _, flag := range []string{"--store-password", "--store-token"} {
			err := cmd([]string{flag, "hunter2"})
			if err == nil || !strings.Contains(err.Error(), "flag provided but not defined") {
				t.Errorf("%s on the command line: %v; want it refused", flag, err)
			}
		}
	}
	var c store.Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	addStoreFlags(fs, &c)
	if err := fs.Parse([]string{"--store-password-file", secret(t, "pa ss"), "--store-token-file", secret(t, "tok")}); err != nil {
		t.Fatal(err)
	}
	if c.Password != "pa ss" || c.Token != "tok" {
		t.Errorf("from files: password %q, token %q", c.Password, c.Token)
	}
	empty := filepath.Join(t.TempDir(), "empty")
	os.WriteFile(empty, nil, 0o600)
	if err := fs.Parse([]string{"--store-password-file", empty}); err == nil {
		t.Errorf("an empty password file was accepted")
	}
	t.Setenv("DNP_STORE_PASSWORD", "from-env")
	if got := (store.Config{}).FromEnv().Password; got != "from-env" {
		t.Errorf("password from the environment: %q", got)
	}
}

// check starts the plugin with good flags and waits for its host key, then,
// while it runs, starts it with each set of bad flags and expects a clear
// refusal at start.
func check(t *testing.T, cfg store.Config, good []string, bads ...[]string) {
	t.Helper()
	dir := t.TempDir()
	common := func(name string) []string {
		return []string{"--advertise-addr", "127.0.0.1", "--socket", filepath.Join(dir, name+".sock"),
			"--netns-dir", filepath.Join(dir, "netns"), "--state-dir", filepath.Join(dir, "state"), "--log-level", "warn"}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- serve(ctx, append(common("good"), good...)) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("plugin with good credentials: %v", err)
		}
	})

	client, err := stores.Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	deadline := time.Now().Add(20 * time.Second)
	for {
		c, cc := context.WithTimeout(context.Background(), 3*time.Second)
		_, err := client.Get(c, driver.HostKey("127.0.0.1"))
		cc()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("plugin with good credentials did not register its host: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	for i, bad := range bads {
		start := time.Now()
		bctx, bcancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := serve(bctx, append(common(fmt.Sprint("bad", i)), bad...))
		bcancel()
		if err == nil || !errors.Is(err, store.ErrDenied) || !strings.Contains(err.Error(), "refuses") {
			t.Errorf("plugin with wrong credentials %v: %v; want it to stop at start, refused by the store", bad[2:], err)
			continue
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Errorf("refusal took %s", d)
		}
		t.Logf("wrong credentials %v: %v", bad[2:], err)
	}
}
