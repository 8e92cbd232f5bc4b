package pluginapi

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Listen opens the plugin's unix socket at path, replacing a stale one.
// The socket is readable and writable by root only (0600) from the moment
// it appears at path: whoever can talk to it can reconfigure the host's
// network. It is made in a private directory (0700) next to path, made
// 0600 there, and renamed into place, so there is no moment at which it
// exists at path with a wider mode (the process umask does not matter).
func Listen(path string) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %s is in use by another plugin process", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale socket: %w", err)
	}
	private, err := os.MkdirTemp(dir, ".s") // 0700; a short name: socket paths are limited to 107 bytes
	if err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	defer os.RemoveAll(private)
	tmp := filepath.Join(private, "s")
	l, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false) // it moves; Serve removes it at path
	if err := os.Chmod(tmp, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("chmod socket: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("move socket to %s: %w", path, err)
	}
	return &listener{Listener: l, path: path}, nil
}

// listener is a unix listener whose socket was renamed to path.
type listener struct {
	net.Listener
	path string
}

func (l *listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Serve answers plugin calls on l until ctx ends, then shuts down
// gracefully and removes the socket file.
func Serve(ctx context.Context, l net.Listener, h http.Handler, log *slog.Logger) error {
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	select {
	case err := <-errc:
		return fmt.Errorf("plugin socket: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down plugin socket", "socket", l.Addr().String())
	shut, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := srv.Shutdown(shut)
	if path := l.Addr().String(); path != "" {
		os.Remove(path)
	}
	return err
}
