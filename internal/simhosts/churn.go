package simhosts

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Change is one write of a churn run.
type Change struct {
	Index int        // the endpoint
	IP    netip.Addr // its address
	Add   bool       // added (else removed)
	At    time.Time  // when the store write was sent
}

// LastWrite is when the last of changes was sent.
func LastWrite(changes []Change) time.Time {
	var last time.Time
	for _, c := range changes {
		if c.At.After(last) {
			last = c.At
		}
	}
	return last
}

// churnWriters write a churn's changes in parallel, each endpoint's by the
// same one (so its remove never overtakes its add), so that one slow store
// round trip does not hold up the schedule.
const churnWriters = 8

// Churn adds and removes simulated endpoints at rate writes per second
// for d, on a fixed schedule: endpoints first, first+1, ... are added until
// keep of them exist, then the oldest is removed and a new one added, in
// turn. Each endpoint is added once at most, so its address appears in a
// kernel once. It returns the writes done, in no particular order, and the
// endpoints still in the store (oldest first). A write runs as soon as it
// is due and its writer is free; the first failed write ends the run.
func (f *Fleet) Churn(ctx context.Context, first, rate int, d time.Duration, keep int) ([]Change, []int, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mu      sync.Mutex
		changes []Change
		failed  error
	)
	queues := make([]chan Change, churnWriters)
	var wg sync.WaitGroup
	for w := range queues {
		q := make(chan Change, rate) // a second's worth of backlog
		queues[w] = q
		wg.Go(func() {
			for c := range q {
				c.At = time.Now()
				var err error
				if c.Add {
					err = f.Add(ctx, c.Index)
				} else {
					err = f.Remove(ctx, c.Index)
				}
				mu.Lock()
				if err != nil && failed == nil {
					failed = err
					cancel()
				}
				if err == nil {
					changes = append(changes, c)
				}
				mu.Unlock()
			}
		})
	}

	var live []int
	next := first
	every := time.Second / time.Duration(rate)
	total := int(d / every)
	start := time.Now()
	for k := range total {
		if wait := time.Until(start.Add(time.Duration(k) * every)); wait > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
		if ctx.Err() != nil {
			break
		}
		var c Change
		if len(live) >= keep {
			c.Index = live[0]
			live = live[1:]
		} else {
			c.Index, c.Add = next, true
			next++
			live = append(live, c.Index)
		}
		c.IP = f.Endpoint(c.Index).IP
		select {
		case queues[c.Index%churnWriters] <- c:
		case <-ctx.Done():
		}
	}
	for _, q := range queues {
		close(q)
	}
	wg.Wait()
	if failed != nil {
		return changes, live, fmt.Errorf("churn: %w", failed)
	}
	return changes, live, nil
}

// Diff compares the kernel with want (Remote of the store's records):
// the permanent neighbour entries want lacks (extra) and those it has
// that are not there (missing), each sorted.
func (k *Kernel) Diff(want map[netip.Addr]bool) (extra, missing []netip.Addr, err error) {
	have, err := k.Neighbours()
	if err != nil {
		return nil, nil, err
	}
	for ip := range have {
		if !want[ip] {
			extra = append(extra, ip)
		}
	}
	for ip := range want {
		if !have[ip] {
			missing = append(missing, ip)
		}
	}
	slices.SortFunc(extra, netip.Addr.Compare)
	slices.SortFunc(missing, netip.Addr.Compare)
	return extra, missing, nil
}

// Host is a real host of the test: its name, underlay address and the
// kernel of its overlay namespace.
type Host struct {
	Name   string
	Addr   netip.Addr
	Kernel *Kernel
}

// Compare reads the store once and compares every host's kernel with it.
// It returns how many entries differ over all hosts (extra plus missing)
// and, if any do, a description with a few examples per host.
func (f *Fleet) Compare(ctx context.Context, hosts []Host) (int, string, error) {
	records, err := f.Records(ctx)
	if err != nil {
		return 0, "", err
	}
	n := 0
	var desc []string
	for _, h := range hosts {
		extra, missing, err := h.Kernel.Diff(Remote(records, h.Addr))
		if err != nil {
			return 0, "", fmt.Errorf("%s: %w", h.Name, err)
		}
		n += len(extra) + len(missing)
		if len(extra)+len(missing) > 0 {
			desc = append(desc, fmt.Sprintf("%s: %d entries no record calls for (e.g. %v), %d records without an entry (e.g. %v)",
				h.Name, len(extra), extra[:min(3, len(extra))], len(missing), missing[:min(3, len(missing))]))
		}
	}
	return n, strings.Join(desc, "; "), nil
}

// WaitConverged polls every interval until every host's kernel holds
// exactly what the store calls for, and returns when it saw that. On
// timeout the error says what still differs.
func (f *Fleet) WaitConverged(ctx context.Context, hosts []Host, every, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		n, desc, err := f.Compare(ctx, hosts)
		now := time.Now()
		if err != nil {
			return now, err
		}
		if n == 0 {
			return now, nil
		}
		if now.After(deadline) {
			return now, fmt.Errorf("kernels still differ from the store after %s: %s", timeout, desc)
		}
		select {
		case <-ctx.Done():
			return now, ctx.Err()
		case <-time.After(every):
		}
	}
}
