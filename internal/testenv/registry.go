package testenv

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// Registry is an image registry started for a test: Debian's
// docker-registry (the CNCF distribution registry) serving HTTPS with a
// certificate of a throwaway CA.
type Registry struct {
	*Process
	Addr string // host:port, the registry part of an image or plugin reference
	CA   []byte // PEM of the CA that signed its certificate: a client's ca.crt
}

// StartRegistry runs /usr/bin/docker-registry on a free port of o.IP, over
// TLS (a certificate with o.IP as its IP SAN), storing in a temporary
// directory, with no authentication. It stops when the test ends.
func StartRegistry(t testing.TB, o ServerOptions) *Registry {
	t.Helper()
	bin := LookPath(t, "docker-registry", "/usr/bin")
	dir := t.TempDir()
	ip := o.Host()
	files := WriteCertsFor(t, dir, ip)
	addr := net.JoinHostPort(ip, strconv.Itoa(FreePort(t)))
	config := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
http:
  addr: %s
  tls:
    certificate: %s
    key: %s
`, filepath.Join(dir, "data"), addr, files.ServerCert, files.ServerKey)
	configFile := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	ca, err := os.ReadFile(files.CA)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	hc := &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
	}}
	r := &Registry{
		Process: &Process{&kvserver.Process{
			Name: "docker-registry",
			Args: o.Command([]string{bin, "serve", configFile}),
			Dir:  dir,
			Ready: func() error {
				// The API's version check: 200 without authentication.
				resp, err := hc.Get("https://" + addr + "/v2/")
				if err != nil {
					return err
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					return fmt.Errorf("/v2/: %s", resp.Status)
				}
				return nil
			},
		}},
		Addr: addr,
		CA:   ca,
	}
	t.Cleanup(func() { r.Stop(t) })
	r.Start(t)
	return r
}
