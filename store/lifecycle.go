package store

import (
	"context"
	"errors"
	"sync"
)

// ErrClosed is the cause of a call made after Close (backends report it
// as ErrUnavailable).
var ErrClosed = errors.New("store is closed")

// Lifecycle is the plumbing a backend shares with the others for what it
// runs in the background (watches, registrations): a context that ends
// with Close, the goroutines Close waits for, and the closed flag. The
// zero value is ready to use.
type Lifecycle struct {
	mu     sync.Mutex
	ctx    context.Context // ends with Close; made on first use
	cancel context.CancelFunc
	closed bool
	wg     sync.WaitGroup
}

// init makes the context; l.mu is held.
func (l *Lifecycle) init() {
	if l.ctx == nil {
		l.ctx, l.cancel = context.WithCancel(context.Background())
	}
}

// Go runs fn on a goroutine that Close waits for. fn's context ends with
// ctx or with Close, whichever comes first. After Close it runs nothing
// and returns ErrClosed.
func (l *Lifecycle) Go(ctx context.Context, fn func(ctx context.Context)) error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.init()
	l.wg.Add(1)
	storeCtx := l.ctx
	l.mu.Unlock()

	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(storeCtx, cancel)
	go func() {
		defer l.wg.Done()
		defer cancel()
		defer stop()
		fn(ctx)
	}()
	return nil
}

// Closed reports whether Close was called.
func (l *Lifecycle) Closed() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.closed
}

// Close ends the contexts of the goroutines Go started and waits until
// they have returned. It reports false when Close was called before (and
// then does not wait).
func (l *Lifecycle) Close() bool {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return false
	}
	l.closed = true
	l.init()
	l.mu.Unlock()
	l.cancel()
	l.wg.Wait()
	return true
}

// Watch is the frame of every backend's Store.Watch of dir (checked by
// the caller): it runs loop on a goroutine of l and returns the channel
// loop sends on, which is closed once loop has returned. loop's context
// ends with ctx or with Close; it sends with Send. After Close it fails
// with ErrUnavailable (naming endpoint).
func (l *Lifecycle) Watch(ctx context.Context, endpoint, dir string, loop func(ctx context.Context, ch chan<- Event)) (<-chan Event, error) {
	ch := make(chan Event, 16)
	err := l.Go(ctx, func(ctx context.Context) {
		defer close(ch)
		loop(ctx, ch)
	})
	if err != nil {
		return nil, Fail(ctx, "watch", dir, endpoint, ErrUnavailable, err)
	}
	return ch, nil
}

// Send delivers ev on a watch channel unless ctx ends first; it reports
// whether it did.
func Send(ctx context.Context, ch chan<- Event, ev Event) bool {
	select {
	case ch <- ev:
		return true
	case <-ctx.Done():
		return false
	}
}

// keepAlive is a registration whose key a loop keeps alive (an etcd
// lease, a Consul or ZooKeeper session, or the wait for the end of the
// embedded store's registration); Lifecycle.KeepAlive makes it.
type keepAlive struct {
	cancel  context.CancelFunc // ends the loop
	done    chan struct{}      // closed once the loop (and lost) returned
	release func(ctx context.Context) error
	once    sync.Once

	mu       sync.Mutex
	released bool // Release ended the loop
	lost     bool // the loop ended by itself and lost ran
}

// KeepAlive is the frame of a backend's registration: it runs keep, the
// loop that keeps the key alive, on a goroutine of l until ctx ends, the
// store is closed or the returned Registration is released. When the
// loop ends without Release, lost runs next on that goroutine: the
// registration removes its key itself, as well as it can. Release stops
// the loop, waits for it and runs release (which removes the key) bounded
// by its ctx, or by DefaultTimeout when that has no deadline. After Close
// KeepAlive runs lost at once and returns ErrClosed.
func (l *Lifecycle) KeepAlive(ctx context.Context, keep func(ctx context.Context), lost func(), release func(ctx context.Context) error) (Registration, error) {
	ctx, cancel := context.WithCancel(ctx)
	k := &keepAlive{cancel: cancel, done: make(chan struct{}), release: release}
	err := l.Go(ctx, func(ctx context.Context) {
		defer close(k.done)
		keep(ctx)
		k.mu.Lock()
		k.lost = !k.released
		k.mu.Unlock()
		if k.lost {
			lost()
		}
	})
	if err != nil {
		cancel()
		lost()
		return nil, err
	}
	return k, nil
}

// Release ends the registration. Only the first call does anything, and
// when the loop had ended by itself, lost did the work: release does not
// run.
func (k *keepAlive) Release(ctx context.Context) error {
	var err error
	k.once.Do(func() {
		k.mu.Lock()
		k.released = true
		k.mu.Unlock()
		k.cancel()
		<-k.done
		if k.lost { // written before done was closed
			return
		}
		ctx, cancel := WithTimeout(ctx)
		defer cancel()
		err = k.release(ctx)
	})
	return err
}
