package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// The kinds of failure every backend reports; test with errors.Is.
var (
	ErrNotFound    = errors.New("key not found")
	ErrConflict    = errors.New("version conflict")
	ErrUnavailable = errors.New("store unavailable")
	ErrTimeout     = errors.New("store timeout")
	ErrInvalid     = errors.New("invalid request")
	// ErrDenied: the store refused the credentials, or they lack the rights.
	ErrDenied = errors.New("store access denied (check the credentials: TLS certificate, token, username and password)")
)

// Error is a failed store call: what was asked, of which server, and why.
type Error struct {
	Op       string // get, list, put, delete, cas, txn, watch, register, open
	Key      string
	Endpoint string
	Kind     error // one of the Err* values above
	Cause    error // the backend's own error, if any
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("store %s", e.Op)
	if e.Key != "" {
		msg += fmt.Sprintf(" %q", e.Key)
	}
	if e.Endpoint != "" {
		msg += " at " + e.Endpoint
	}
	msg += ": " + e.Kind.Error()
	if e.Cause != nil && e.Cause.Error() != e.Kind.Error() {
		msg += ": " + e.Cause.Error()
	}
	return msg
}

// Unwrap lets errors.Is match both the kind and the cause.
func (e *Error) Unwrap() []error {
	if e.Cause == nil {
		return []error{e.Kind}
	}
	return []error{e.Kind, e.Cause}
}

// Fail builds an *Error. When ctx has expired the kind becomes ErrTimeout,
// whatever the backend said, so callers see one consistent answer.
func Fail(ctx context.Context, op, key, endpoint string, kind, cause error) error {
	if kind != ErrNotFound && kind != ErrConflict && kind != ErrDenied && ctx != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		kind = ErrTimeout
	}
	return &Error{Op: op, Key: key, Endpoint: endpoint, Kind: kind, Cause: cause}
}

// ValidKey reports whether key is a well-formed relative key: no leading
// or trailing "/", no empty, "." or ".." segments (which some backends
// would resolve as paths). Every backend checks every key with it.
func ValidKey(key string) error {
	if key == "" {
		return fmt.Errorf("%w: empty key", ErrInvalid)
	}
	if key[0] == '/' || key[len(key)-1] == '/' {
		return fmt.Errorf("%w: key %q must not start or end with /", ErrInvalid, key)
	}
	for _, seg := range strings.Split(key, "/") {
		switch seg {
		case "":
			return fmt.Errorf("%w: key %q has an empty segment", ErrInvalid, key)
		case ".", "..":
			return fmt.Errorf("%w: key %q has a %q segment", ErrInvalid, key, seg)
		}
	}
	return nil
}

// CheckOps validates a transaction before a backend runs it.
func CheckOps(ops []Op) error {
	if len(ops) == 0 {
		return fmt.Errorf("%w: empty transaction", ErrInvalid)
	}
	if len(ops) > MaxTxnOps {
		return fmt.Errorf("%w: %d operations, at most %d", ErrInvalid, len(ops), MaxTxnOps)
	}
	seen := make(map[string]bool, len(ops))
	for _, op := range ops {
		if err := ValidKey(op.Key); err != nil {
			return err
		}
		if seen[op.Key] {
			return fmt.Errorf("%w: key %q appears twice in one transaction", ErrInvalid, op.Key)
		}
		seen[op.Key] = true
		switch op.Kind {
		case OpCreate, OpPut:
		case OpUpdate, OpDelete:
			if op.Version <= 0 {
				return fmt.Errorf("%w: %s of %q needs a version", ErrInvalid, op.Kind, op.Key)
			}
		default:
			return fmt.Errorf("%w: unknown operation %d on %q", ErrInvalid, op.Kind, op.Key)
		}
	}
	return nil
}

// CheckCAS validates a compare-and-swap before a backend runs it.
func CheckCAS(key string, version int64) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	if version < 0 {
		return fmt.Errorf("%w: negative version %d", ErrInvalid, version)
	}
	return nil
}

// CheckRegistration validates a Register before a backend with liveness
// runs it.
func CheckRegistration(key string, ttl time.Duration) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	if ttl <= 0 {
		return fmt.Errorf("%w: ttl %s is not positive", ErrInvalid, ttl)
	}
	return nil
}
