package etcd

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// tokenAuth logs in to etcd with a username and password and puts the
// token on every request, logging in again when etcd refuses the token.
//
// The etcd client can do this itself, but when its token goes stale
// (etcd restarted, or the token sat unused past --auth-token-ttl) it sends
// the stale token along with its new Authenticate request, and etcd 3.4
// (Debian 12's) refuses that request too: the client then retries until
// the call's deadline and never recovers. Here the login request carries
// no token.
type tokenAuth struct {
	user, password string

	mu       sync.Mutex
	cli      *clientv3.Client // the store's client, set once it exists
	token    string
	loggedIn bool // token is current ("" when auth is off on the server)
}

type loginKey struct{}

// GetRequestMetadata gives each request the current token, logging in
// first when there is none.
func (a *tokenAuth) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if ctx.Value(loginKey{}) != nil {
		return nil, nil // the login request itself
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.loggedIn {
		if err := a.login(ctx); err != nil {
			return nil, err
		}
	}
	if a.token == "" {
		return nil, nil
	}
	return map[string]string{rpctypes.TokenFieldNameGRPC: a.token}, nil
}

// RequireTransportSecurity is false: etcd's tokens also work without TLS.
func (a *tokenAuth) RequireTransportSecurity() bool { return false }

// login gets a new token; a.mu is held.
func (a *tokenAuth) login(ctx context.Context) error {
	if a.cli == nil {
		return status.Error(codes.Unavailable, "etcd client not ready")
	}
	resp, err := a.cli.Authenticate(context.WithValue(ctx, loginKey{}, true), a.user, a.password)
	switch {
	case errors.Is(err, rpctypes.ErrAuthNotEnabled):
		a.token, a.loggedIn = "", true
		return nil
	case err != nil && errCode(err) == codes.Unavailable:
		// Retried by the etcd client, like any unreachable server.
		return status.Errorf(codes.Unavailable, "log in to etcd as %q: %v", a.user, err)
	case err != nil:
		// gRPC fails the request as Unauthenticated with this text.
		return fmt.Errorf("log in to etcd as %q: %v", a.user, err)
	}
	a.token, a.loggedIn = resp.Token, true
	return nil
}

func (a *tokenAuth) setClient(cli *clientv3.Client) {
	a.mu.Lock()
	a.cli = cli
	a.mu.Unlock()
}

// check forgets the token when etcd refused it, so the next request (the
// etcd client retries this one) logs in again.
func (a *tokenAuth) check(err error) {
	if err == nil {
		return
	}
	e := rpctypes.Error(err)
	if errors.Is(e, rpctypes.ErrInvalidAuthToken) || errors.Is(e, rpctypes.ErrAuthOldRevision) ||
		errors.Is(e, rpctypes.ErrUserEmpty) {
		a.mu.Lock()
		a.token, a.loggedIn = "", false
		a.mu.Unlock()
	}
}

// dialOptions attach the token to requests and watch their answers.
func (a *tokenAuth) dialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithPerRPCCredentials(a),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
			cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			err := invoker(ctx, method, req, reply, cc, opts...)
			a.check(err)
			return err
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
			method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			cs, err := streamer(ctx, desc, cc, method, opts...)
			if err != nil {
				a.check(err)
				return nil, err
			}
			return &checkedStream{ClientStream: cs, a: a}, nil
		}),
	}
}

// checkedStream lets tokenAuth see the errors of a stream (watch, lease
// keepalive).
type checkedStream struct {
	grpc.ClientStream
	a *tokenAuth
}

func (s *checkedStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	s.a.check(err)
	return err
}
