package zk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-zookeeper/zk"

	"github.com/dnplabs/docker-net-plugin/store"
)

// session is one ZooKeeper client connection and what we know of its state.
// The go-zookeeper client connects and reconnects in the background; session
// tracks its state changes so calls can wait for a usable session, and
// re-sends nothing itself: the client re-sends credentials after every
// reconnect once AddAuth has succeeded once.
type session struct {
	conn     *zk.Conn
	endpoint string
	forward  func(zk.Event) // also receives every client event; may be nil

	mu      sync.Mutex
	state   zk.State
	authed  bool          // digest credentials accepted (or none configured)
	changed chan struct{} // closed and replaced on every change of state or authed
	done    chan struct{} // closed by close
	once    sync.Once
}

// dial starts a client for hosts with the given session timeout. It does
// not wait for a connection.
func dial(hosts []string, timeout time.Duration, user, password, endpoint string, forward func(zk.Event)) (*session, error) {
	s := &session{
		endpoint: endpoint,
		forward:  forward,
		state:    zk.StateDisconnected,
		authed:   user == "",
		changed:  make(chan struct{}),
		done:     make(chan struct{}),
	}
	conn, _, err := zk.Connect(hosts, timeout,
		zk.WithLogger(slogLogger{endpoint: endpoint}),
		zk.WithEventCallback(s.onEvent),
		zk.WithDialer(handshakeDialer(handshakeWait(timeout))))
	if err != nil {
		return nil, err
	}
	s.conn = conn
	if user != "" {
		go s.authenticate(user, password)
	}
	return s, nil
}

// onEvent runs on the client's own goroutines for every event: it must
// not block.
func (s *session) onEvent(ev zk.Event) {
	if ev.Type == zk.EventSession {
		s.mu.Lock()
		if s.state != ev.State {
			s.state = ev.State
			close(s.changed)
			s.changed = make(chan struct{})
		}
		s.mu.Unlock()
		slog.Debug("zookeeper session state", "endpoint", s.endpoint, "state", ev.State.String())
	}
	if s.forward != nil {
		s.forward(ev)
	}
}

// status says whether calls can be made now, the current state, and gives
// a channel that is closed at the next change.
func (s *session) status() (ready bool, state zk.State, changed <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state == zk.StateHasSession && s.authed, s.state, s.changed
}

// waitReady waits until the session is usable. With limit > 0 it gives up
// after limit with an error saying the server is unreachable.
func (s *session) waitReady(ctx context.Context, limit time.Duration) error {
	var expired <-chan time.Time
	if limit > 0 {
		t := time.NewTimer(limit)
		defer t.Stop()
		expired = t.C
	}
	for {
		ready, state, changed := s.status()
		if ready {
			return nil
		}
		select {
		case <-changed:
		case <-expired:
			if state == zk.StateHasSession {
				return errors.New("not authenticated yet")
			}
			return fmt.Errorf("no session with the server (%s)", state)
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return store.ErrClosed
		}
	}
}

// authenticate sends the digest credentials once a session exists, and
// retries until the server has accepted them; the client re-sends them by
// itself on every later connection.
func (s *session) authenticate(user, password string) {
	for {
		s.mu.Lock()
		state, changed := s.state, s.changed
		s.mu.Unlock()
		if state == zk.StateHasSession {
			err := s.conn.AddAuth("digest", []byte(user+":"+password))
			if err == nil {
				s.mu.Lock()
				s.authed = true
				close(s.changed)
				s.changed = make(chan struct{})
				s.mu.Unlock()
				return
			}
			slog.Debug("zookeeper digest auth failed, will retry", "endpoint", s.endpoint, "err", err)
			select {
			case <-time.After(200 * time.Millisecond):
			case <-s.done:
				return
			}
			continue
		}
		select {
		case <-changed:
		case <-s.done:
			return
		}
	}
}

// close ends the session: the server removes its ephemeral nodes.
func (s *session) close() {
	s.once.Do(func() {
		close(s.done)
		s.conn.Close()
	})
}

// slogLogger routes the client's own log lines to slog at debug level.
type slogLogger struct{ endpoint string }

func (l slogLogger) Printf(format string, args ...any) {
	slog.Debug("zookeeper client: "+fmt.Sprintf(format, args...), "endpoint", l.endpoint)
}

// handshakeWait is how long a new connection waits for the server's
// answer to its connect request: a third of the session timeout, between
// 2 s and 5 s. The client library itself waits 10 times its receive
// timeout (over a minute for a 10 s session), but a server can take the
// connection and never answer: ZooKeeper 3.8 does that to clients that
// connect while it starts (closing them fails with a NullPointerException
// and leaves the socket open). The client must give up on such a server
// and try again (another one, or the same) well before its session expires.
func handshakeWait(sessionTimeout time.Duration) time.Duration {
	return min(max(sessionTimeout/3, 2*time.Second), 5*time.Second)
}

// handshakeDialer dials like the library's default dialer, and caps the
// read deadline of each connection's handshake (see handshakeWait).
func handshakeDialer(wait time.Duration) zk.Dialer {
	return func(network, address string, timeout time.Duration) (net.Conn, error) {
		c, err := net.DialTimeout(network, address, timeout)
		if err != nil {
			return nil, err
		}
		return &handshakeConn{Conn: c, wait: wait}, nil
	}
}

// handshakeConn caps read deadlines at wait from now until the server has
// sent its first byte (the connect response); then it is a plain conn.
type handshakeConn struct {
	net.Conn
	wait     time.Duration
	answered atomic.Bool
}

func (c *handshakeConn) SetReadDeadline(t time.Time) error {
	if !c.answered.Load() && !t.IsZero() {
		if limit := time.Now().Add(c.wait); limit.Before(t) {
			t = limit
		}
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *handshakeConn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.SetReadDeadline(t)
}

func (c *handshakeConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.answered.Store(true)
	}
	return n, err
}
