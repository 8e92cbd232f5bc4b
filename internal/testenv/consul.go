package testenv

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// StartConsul runs a one-server Consul cluster on free ports of o.IP, with
// its data in a temporary directory, and stops it when the test ends.
//
// It is a real server agent, not -dev, so its data survives Stop and Start
// on the returned server (same data, same ports). DNS and gRPC are off and
// it never calls home. The binary is $CONSUL_BIN, /opt/dnp/bin/consul or
// consul on PATH; scripts/build-consul.sh builds it.
func StartConsul(t testing.TB, o ServerOptions) *Server {
	t.Helper()
	return StartConsulWith(t, o, ConsulConfig{})
}

// ConsulConfig is what StartConsulWith adds to a plain StartConsul.
type ConsulConfig struct {
	// HCL fragments added to the agent's configuration (tls, acl blocks).
	HCL []string
	// HTTPS also serves the HTTP API with TLS on a free port, which then
	// is Server.Addr; the HCL must configure the certificates.
	HTTPS bool
	// Token is the ACL token the readiness check writes with.
	Token string
}

// StartConsulWith is StartConsul with extra configuration. Readiness is
// always checked on the plain HTTP port.
func StartConsulWith(t testing.TB, o ServerOptions, cc ConsulConfig) *Server {
	t.Helper()
	bin := os.Getenv("CONSUL_BIN")
	if bin == "" {
		bin = LookPath(t, "consul", "/opt/dnp/bin")
	} else if _, err := os.Stat(bin); err != nil {
		Missing(t, "CONSUL_BIN=%s: %v (run scripts/build-consul.sh)", bin, err)
	}
	ip := o.Host()
	ports := freePorts(t, 5)
	httpPort, serfLAN, serfWAN, serverPort := ports[0], ports[1], ports[2], ports[3]
	dir := t.TempDir()
	httpAddr := net.JoinHostPort(ip, strconv.Itoa(httpPort))
	addr := httpAddr

	args := []string{bin, "agent",
		"-server",
		"-bootstrap-expect", "1",
		"-node", "test",
		"-disable-host-node-id",
		"-bind", ip,
		"-client", ip,
		"-data-dir", filepath.Join(dir, "data"),
		"-http-port", strconv.Itoa(httpPort),
		"-serf-lan-port", strconv.Itoa(serfLAN),
		"-serf-wan-port", strconv.Itoa(serfWAN),
		"-server-port", strconv.Itoa(serverPort),
		"-dns-port", "-1",
		"-grpc-port", "-1",
		"-grpc-tls-port", "-1",
		"-hcl", "performance { raft_multiplier = 1 }",
		"-hcl", "disable_update_check = true",
	}
	if cc.HTTPS {
		args = append(args, "-https-port", strconv.Itoa(ports[4]))
		addr = net.JoinHostPort(ip, strconv.Itoa(ports[4]))
	}
	for _, h := range cc.HCL {
		args = append(args, "-hcl", h)
	}
	srv := &Server{
		Process: &Process{&kvserver.Process{
			Name:  "consul",
			Args:  o.Command(args),
			Dir:   dir,
			Ready: consulWrites(&http.Client{Timeout: time.Second}, "http://"+httpAddr, cc.Token),
		}},
		Scheme: "consul",
		Addr:   addr,
	}
	t.Cleanup(func() { srv.Stop(t) })
	srv.Start(t)
	return srv
}

// consulWrites succeeds once a KV write and delete go through the agent at
// base (with token, if any), that is once it has joined and the cluster has
// a leader whose raft applies writes (an open port is not enough), and a
// session can be made there.
func consulWrites(hc *http.Client, base, token string) func() error {
	// call sends one request and returns the answer's body, or why not.
	call := func(method, path, body string) ([]byte, error) {
		req, err := http.NewRequest(method, base+path, strings.NewReader(body))
		if err != nil {
			return nil, err
		}
		if token != "" {
			req.Header.Set("X-Consul-Token", token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			return nil, err
		}
		defer resp.Body.Close()
		out, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("%s %s: %s %q", method, path, resp.Status, out)
		}
		return out, nil
	}
	key := "/v1/kv/testenv-ready-" + strconv.Itoa(os.Getpid())
	return func() error {
		if _, err := call(http.MethodPut, key, "1"); err != nil {
			return err
		}
		if _, err := call(http.MethodDelete, key, ""); err != nil {
			return err
		}
		// A session needs this agent's node in the catalog, which comes a
		// little after the leader: the plugin's registration is a session.
		out, err := call(http.MethodPut, "/v1/session/create", `{"TTL":"10s"}`)
		if err != nil {
			return err
		}
		var s struct{ ID string }
		if err := json.Unmarshal(out, &s); err != nil || s.ID == "" {
			return fmt.Errorf("PUT /v1/session/create: %q: %v", out, err)
		}
		_, err = call(http.MethodPut, "/v1/session/destroy/"+s.ID, "")
		return err
	}
}

// freePorts returns n distinct free loopback ports.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	seen := make(map[int]bool)
	var ports []int
	for len(ports) < n {
		p := FreePort(t)
		if !seen[p] {
			seen[p] = true
			ports = append(ports, p)
		}
	}
	return ports
}
