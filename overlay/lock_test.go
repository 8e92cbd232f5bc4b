package overlay

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// TestHostLock: shared holders do not wait for each other; an exclusive
// holder waits until every shared one is gone, and a shared one waits for
// the exclusive one; nobody waits past its context.
func TestHostLock(t *testing.T) {
	h := &Host{Dir: filepath.Join(t.TempDir(), "netns"), Prefix: "lk-"}
	if got, want := h.LockPath(), filepath.Join(filepath.Dir(h.Dir), ".lk-lock"); got != want {
		t.Fatalf("lock path %s, want %s", got, want)
	}
	ctx := context.Background()
	short := func() context.Context {
		c, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
		t.Cleanup(cancel)
		return c
	}
	s1, err := h.LockShared(ctx)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := h.LockShared(short())
	if err != nil {
		t.Fatalf("a second shared holder waited for the first: %v", err)
	}
	if _, err := h.LockExclusive(short()); err == nil {
		t.Fatal("exclusive lock taken while shared holders hold it")
	}
	s1()
	s2()
	x, err := h.LockExclusive(short())
	if err != nil {
		t.Fatalf("exclusive lock with no holder: %v", err)
	}
	if _, err := h.LockShared(short()); err == nil {
		t.Fatal("shared lock taken while an exclusive holder holds it")
	}
	done := make(chan error, 1)
	go func() {
		unlock, err := h.LockShared(ctx)
		if err == nil {
			unlock()
		}
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	x()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("a waiting shared holder did not get the lock once the exclusive one let go")
	}
}
