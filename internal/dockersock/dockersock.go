// Package dockersock reaches the Docker Engine API over its unix socket.
package dockersock

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
)

// Transport is an HTTP transport whose connections go to the Docker
// Engine API at host (unix:///path/to/docker.sock), keeping up to
// maxIdleConns idle. Requests name any host (http://docker/...). It also
// returns the socket's path, for messages.
func Transport(host string, maxIdleConns int) (*http.Transport, string, error) {
	path, ok := strings.CutPrefix(host, "unix://")
	if !ok || path == "" {
		return nil, "", fmt.Errorf("docker host %q: want unix:///path/to/docker.sock", host)
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		MaxIdleConns: maxIdleConns,
	}
	return tr, path, nil
}
