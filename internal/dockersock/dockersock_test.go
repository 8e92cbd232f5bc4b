package dockersock

import (
	"io"
	"net"
	"net/http"
	"path/filepath"
	"testing"
)

func TestTransportReachesSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "docker.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "pong "+r.URL.Path)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	tr, path, err := Transport("unix://"+sock, 2)
	if err != nil {
		t.Fatal(err)
	}
	if path != sock {
		t.Errorf("socket path %q, want %q", path, sock)
	}
	resp, err := (&http.Client{Transport: tr}).Get("http://docker/_ping")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "pong /_ping" {
		t.Errorf("answer %q, want %q", b, "pong /_ping")
	}
}

func TestTransportWantsUnixURL(t *testing.T) {
	for _, host := range []string{"", "unix://", "tcp://127.0.0.1:2375", "/var/run/docker.sock"} {
		if _, _, err := Transport(host, 2); err == nil {
			t.Errorf("Transport(%q) accepted it", host)
		}
	}
}
