package store

import (
	"context"
	"time"
)

// Backoff is a capped exponential wait between attempts, for backends
// that retry a watch or a registration by themselves. The zero value waits
// 100 ms first, doubling up to 2 s.
type Backoff struct{ next time.Duration }

const (
	backoffMin = 100 * time.Millisecond
	backoffMax = 2 * time.Second
)

// Wait sleeps for the next delay, or returns false when ctx ends first.
func (b *Backoff) Wait(ctx context.Context) bool {
	if b.next == 0 {
		b.next = backoffMin
	}
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(2*b.next, backoffMax)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Reset makes the next Wait short again, after a success.
func (b *Backoff) Reset() { b.next = 0 }
