package store

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"
)

// A watch ends with Close: its channel is closed by the time Close
// returns, and no watch starts after Close.
func TestLifecycleWatchEndsWithClose(t *testing.T) {
	var l Lifecycle
	var running atomic.Bool
	ch, err := l.Watch(context.Background(), "test://", "d", func(ctx context.Context, ch chan<- Event) {
		running.Store(true)
		defer running.Store(false)
		if !Send(ctx, ch, Event{Type: EventReset}) {
			return
		}
		<-ctx.Done()
	})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-ch; ev.Type != EventReset {
		t.Fatalf("first event %v, want reset", ev.Type)
	}
	if !l.Close() {
		t.Fatal("first Close reported an earlier one")
	}
	if running.Load() {
		t.Fatal("Close returned while the watch loop still ran")
	}
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("event after Close")
		}
	default:
		t.Fatal("watch channel still open after Close")
	}
	if l.Close() {
		t.Fatal("second Close did not report the first")
	}
	if _, err := l.Watch(context.Background(), "test://", "d", func(context.Context, chan<- Event) {}); !errors.Is(err, ErrUnavailable) || !errors.Is(err, ErrClosed) {
		t.Fatalf("watch after Close: %v, want ErrUnavailable for ErrClosed", err)
	}
}

// A watch also ends with its own context, and the store stays open.
func TestLifecycleWatchEndsWithCtx(t *testing.T) {
	var l Lifecycle
	defer l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := l.Watch(ctx, "test://", "d", func(ctx context.Context, ch chan<- Event) { <-ctx.Done() })
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	select {
	case _, ok := <-ch:
		if ok {
			t.Fatal("unexpected event")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("watch channel not closed 5s after its context ended")
	}
	if l.Closed() {
		t.Fatal("the store counts as closed after one watch ended")
	}
}

// keepAliveProbe counts what a KeepAlive ran.
type keepAliveProbe struct {
	lost, released atomic.Int32
}

func (p *keepAliveProbe) start(t *testing.T, l *Lifecycle, ctx context.Context) Registration {
	t.Helper()
	reg, err := l.KeepAlive(ctx, func(ctx context.Context) { <-ctx.Done() }, p.lostRan, p.release)
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

func (p *keepAliveProbe) lostRan() { p.lost.Add(1) }

func (p *keepAliveProbe) release(ctx context.Context) error {
	p.released.Add(1)
	if _, ok := ctx.Deadline(); !ok {
		return errors.New("release ran without a deadline")
	}
	return nil
}

func (p *keepAliveProbe) want(t *testing.T, lost, released int32) {
	t.Helper()
	if l, r := p.lost.Load(), p.released.Load(); l != lost || r != released {
		t.Fatalf("lost ran %d times, release %d times; want %d and %d", l, r, lost, released)
	}
}

// Release ends the loop and runs release once, with a deadline; lost
// does not run.
func TestKeepAliveRelease(t *testing.T) {
	var l Lifecycle
	defer l.Close()
	var p keepAliveProbe
	reg := p.start(t, &l, context.Background())
	for range 2 {
		if err := reg.Release(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	p.want(t, 0, 1)
}

// A registration whose context ends, or whose store closes, runs lost
// (by the time Close returns); a Release after that does nothing. After
// Close, KeepAlive runs lost at once and fails.
func TestKeepAliveLost(t *testing.T) {
	var l Lifecycle
	var p keepAliveProbe
	ctx, cancel := context.WithCancel(context.Background())
	byCtx := p.start(t, &l, ctx)
	p.start(t, &l, context.Background())
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for p.lost.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	p.want(t, 1, 0)
	l.Close()
	p.want(t, 2, 0)
	if err := byCtx.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	p.want(t, 2, 0)
	if _, err := l.KeepAlive(context.Background(), func(context.Context) {}, p.lostRan, p.release); !errors.Is(err, ErrClosed) {
		t.Fatalf("keepalive after Close: %v, want ErrClosed", err)
	}
	p.want(t, 3, 0)
}
