package zk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/go-zookeeper/zk"
)

// errClosed is the cause reported after Close.
var errClosed = errors.New("store closed")

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
		zk.WithEventCallback(s.onEvent))
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
			return errClosed
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
