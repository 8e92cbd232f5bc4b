package overlay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Processes that change one Host's overlays (the plugin, `doctor --fix`)
// coordinate with an advisory lock (flock) on a file next to the namespace
// directory: the plugin holds it shared while it builds or changes
// overlays, so its own operations never wait for each other; a repair
// holds it exclusively, so that what it reads and then removes cannot be
// built or used by a plugin operation in between.

// LockPath is the lock file of the Host's overlays: .<prefix>lock in the
// parent of Dir (not in Dir, where `ip netns` would list it).
func (h *Host) LockPath() string {
	return filepath.Join(filepath.Dir(filepath.Clean(h.dir())), "."+h.prefix()+"lock")
}

// LockShared takes the lock shared, for a plugin operation that builds or
// changes overlays; it waits while a repair holds it, until ctx ends.
func (h *Host) LockShared(ctx context.Context) (unlock func(), err error) {
	return h.lock(ctx, unix.LOCK_SH)
}

// LockExclusive takes the lock exclusively, for a repair that removes what
// it finds stray; it waits for the plugin operations in flight, until ctx
// ends.
func (h *Host) LockExclusive(ctx context.Context) (unlock func(), err error) {
	return h.lock(ctx, unix.LOCK_EX)
}

func (h *Host) lock(ctx context.Context, how int) (func(), error) {
	if err := validName("prefix", h.prefix()); err != nil {
		return nil, err
	}
	path := h.LockPath()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	// An open file of its own per holder: flock locks belong to the open
	// file, so two goroutines sharing one would not exclude each other.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	for wait := time.Millisecond; ; wait = min(2*wait, 20*time.Millisecond) {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing the file releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("lock %s: held by another process (doctor --fix?) for too long: %w", path, ctx.Err())
		case <-time.After(wait):
		}
	}
}
