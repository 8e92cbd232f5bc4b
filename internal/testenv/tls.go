package testenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// TLSFiles are PEM files of a throwaway CA and the certificates it signed
// (for 127.0.0.1), made by a test.
type TLSFiles struct {
	CA, ServerCert, ServerKey, ClientCert, ClientKey string
}

// WriteCerts makes a CA, a server and a client certificate in dir.
func WriteCerts(t testing.TB, dir string) TLSFiles {
	t.Helper()
	return WriteCertsFor(t, dir, "127.0.0.1")
}

// WriteCertsFor is WriteCerts with the server certificate for ip (an IP
// SAN) instead of 127.0.0.1.
func WriteCertsFor(t testing.TB, dir, ip string) TLSFiles {
	t.Helper()
	serverIP := net.ParseIP(ip)
	if serverIP == nil {
		t.Fatalf("certificate for %q: not an IP address", ip)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage) (string, string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			IPAddresses:  []net.IP{serverIP},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return write(cn+".pem", "CERTIFICATE", der), write(cn+"-key.pem", "EC PRIVATE KEY", kder)
	}
	f := TLSFiles{CA: write("ca.pem", "CERTIFICATE", caDER)}
	f.ServerCert, f.ServerKey = issue(2, "server", x509.ExtKeyUsageServerAuth)
	f.ClientCert, f.ClientKey = issue(3, "client", x509.ExtKeyUsageClientAuth)
	return f
}

// StartEtcdTLS runs etcd on 127.0.0.1 serving clients over TLS and
// requiring a client certificate signed by the test CA.
func StartEtcdTLS(t testing.TB) (*Server, TLSFiles) {
	bin := LookPath(t, "etcd", "/usr/bin")
	dir := t.TempDir()
	files := WriteCerts(t, dir)
	clientPort, peerPort := FreePort(t), FreePort(t)
	for peerPort == clientPort {
		peerPort = FreePort(t)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(clientPort))
	peerURL := "http://" + net.JoinHostPort("127.0.0.1", strconv.Itoa(peerPort))

	cert, err := tls.LoadX509KeyPair(files.ClientCert, files.ClientKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	caPEM, _ := os.ReadFile(files.CA)
	pool.AppendCertsFromPEM(caPEM)
	hc := &http.Client{Timeout: 500 * time.Millisecond, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}},
	}}
	srv := &Server{
		Process: &Process{&kvserver.Process{
			Name: "etcd-tls",
			Args: []string{bin, "--name", "tls", "--data-dir", filepath.Join(dir, "data"),
				"--listen-client-urls", "https://" + addr, "--advertise-client-urls", "https://" + addr,
				"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
				"--initial-cluster", "tls=" + peerURL,
				"--cert-file", files.ServerCert, "--key-file", files.ServerKey,
				"--trusted-ca-file", files.CA, "--client-cert-auth",
				"--logger", "zap", "--log-outputs", "stderr"},
			Dir:   dir,
			Ready: kvserver.EtcdHealthy(hc, "https://"+addr),
		}},
		Scheme: "etcd",
		Addr:   addr,
	}
	t.Cleanup(func() { srv.Stop(t) })
	srv.Start(t)
	return srv, files
}
