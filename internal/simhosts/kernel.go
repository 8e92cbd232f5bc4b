package simhosts

import (
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// Kernel reads (and, for cold starts, clears) the peer entries of one
// overlay namespace: the bridge's permanent neighbour entries (one per
// remote endpoint address), the VXLAN device's forwarding entries and the
// static bridge entries on the VXLAN port.
type Kernel struct {
	h            *netlink.Handle
	brIdx, vxIdx int
}

// OpenKernel opens the overlay namespace at nsPath (VXLAN overlays only).
func OpenKernel(nsPath string) (*Kernel, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	br, err := h.LinkByName(overlay.BridgeDevice)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("bridge in %s: %w", nsPath, err)
	}
	vx, err := h.LinkByName(overlay.VXLANDevice)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("vxlan device in %s: %w", nsPath, err)
	}
	return &Kernel{h: h, brIdx: br.Attrs().Index, vxIdx: vx.Attrs().Index}, nil
}

// Close releases the netlink handle.
func (k *Kernel) Close() { k.h.Close() }

// dump retries a netlink dump the kernel interrupted because the table
// changed meanwhile (often, while thousands of entries come and go).
func dump(list func() ([]netlink.Neigh, error)) ([]netlink.Neigh, error) {
	return sysutil.RetryDump(10, list)
}

func (k *Kernel) neighbours() ([]netlink.Neigh, error) {
	list, err := dump(func() ([]netlink.Neigh, error) { return k.h.NeighList(k.brIdx, unix.AF_INET) })
	if err != nil {
		return nil, fmt.Errorf("list neighbours: %w", err)
	}
	out := list[:0]
	for _, e := range list {
		if e.State&netlink.NUD_PERMANENT != 0 && e.IP != nil {
			out = append(out, e)
		}
	}
	return out, nil
}

// Neighbours returns the addresses of the permanent IPv4 neighbour
// entries on the bridge.
func (k *Kernel) Neighbours() (map[netip.Addr]bool, error) {
	list, err := k.neighbours()
	if err != nil {
		return nil, err
	}
	out := make(map[netip.Addr]bool, len(list))
	for _, e := range list {
		if ip, ok := netip.AddrFromSlice(e.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

// CountNeighbours counts the permanent IPv4 neighbour entries on the bridge.
func (k *Kernel) CountNeighbours() (int, error) {
	list, err := k.neighbours()
	return len(list), err
}

// CountFDB counts the VXLAN device's own forwarding entries.
func (k *Kernel) CountFDB() (int, error) {
	list, err := dump(func() ([]netlink.Neigh, error) { return k.h.NeighList(k.vxIdx, unix.AF_BRIDGE) })
	if err != nil {
		return 0, fmt.Errorf("list forwarding entries: %w", err)
	}
	n := 0
	for _, e := range list {
		if e.Flags&netlink.NTF_SELF != 0 && e.IP != nil {
			n++
		}
	}
	return n, nil
}

// WaitCount polls every interval until exactly want permanent neighbour
// entries exist and returns when it saw them.
func (k *Kernel) WaitCount(want int, every, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	for {
		n, err := k.CountNeighbours()
		now := time.Now()
		if err != nil {
			return now, err
		}
		if n == want {
			return now, nil
		}
		if now.After(deadline) {
			return now, fmt.Errorf("%d neighbour entries after %s, want %d", n, timeout, want)
		}
		time.Sleep(every)
	}
}

// FlushPeers deletes every peer entry (what a plugin programs for remote
// endpoints and hosts), so that the next plugin start programs them from
// nothing. The entries of local containers are left alone.
func (k *Kernel) FlushPeers() error {
	neigh, err := k.neighbours()
	if err != nil {
		return err
	}
	fdb, err := dump(func() ([]netlink.Neigh, error) { return k.h.NeighList(k.vxIdx, unix.AF_BRIDGE) })
	if err != nil {
		return fmt.Errorf("list forwarding entries: %w", err)
	}
	for _, e := range fdb {
		// The VXLAN device's own entries, and the static bridge entries
		// on its port (not the bridge's permanent entry for the port's
		// own MAC).
		if e.Flags&netlink.NTF_SELF != 0 || e.State&netlink.NUD_NOARP != 0 {
			neigh = append(neigh, e)
		}
	}
	for _, e := range neigh {
		if err := k.h.NeighDel(&e); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("delete %s %s: %w", e.IP, e.HardwareAddr, err)
		}
	}
	return nil
}

// Monitor timestamps, in one overlay namespace, when a permanent IPv4
// neighbour entry for each address first appears and when it is deleted.
type Monitor struct {
	mu      sync.Mutex
	added   map[netip.Addr]time.Time
	removed map[netip.Addr]time.Time
	err     error
	kick    chan struct{} // a new event (or error) arrived
	done    chan struct{}
}

// StartMonitor subscribes to the neighbour events of the namespace at
// nsPath (with a receive buffer for bursts of thousands). Close it when
// done; Err says whether events were lost.
func StartMonitor(nsPath string) (*Monitor, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", nsPath, err)
	}
	defer ns.Close() // the subscription keeps its own socket in the namespace
	m := &Monitor{added: map[netip.Addr]time.Time{}, removed: map[netip.Addr]time.Time{},
		kick: make(chan struct{}, 1), done: make(chan struct{})}
	ch := make(chan netlink.NeighUpdate, 4096)
	err = netlink.NeighSubscribeWithOptions(ch, m.done, netlink.NeighSubscribeOptions{
		Namespace:              &ns,
		ReceiveBufferSize:      16 << 20,
		ReceiveBufferForceSize: true,
		ErrorCallback: func(err error) {
			m.mu.Lock()
			if m.err == nil {
				m.err = err
			}
			m.mu.Unlock()
			m.wake()
		},
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe to neighbour events in %s: %w", nsPath, err)
	}
	go func() {
		for u := range ch {
			at := time.Now()
			if u.Family != unix.AF_INET || u.IP == nil {
				continue
			}
			ip, ok := netip.AddrFromSlice(u.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			m.mu.Lock()
			switch {
			case u.Type == unix.RTM_NEWNEIGH && u.State&netlink.NUD_PERMANENT != 0:
				if _, seen := m.added[ip]; !seen {
					m.added[ip] = at
				}
			case u.Type == unix.RTM_DELNEIGH:
				if _, seen := m.removed[ip]; !seen {
					m.removed[ip] = at
				}
			}
			m.mu.Unlock()
			m.wake()
		}
	}()
	return m, nil
}

func (m *Monitor) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// WaitAdded returns when the entry for ip appeared, waiting up to timeout.
func (m *Monitor) WaitAdded(ip netip.Addr, timeout time.Duration) (time.Time, error) {
	return m.wait(m.added, ip, "appeared", timeout)
}

// WaitRemoved returns when the entry for ip was deleted, waiting up to
// timeout.
func (m *Monitor) WaitRemoved(ip netip.Addr, timeout time.Duration) (time.Time, error) {
	return m.wait(m.removed, ip, "was deleted", timeout)
}

func (m *Monitor) wait(seen map[netip.Addr]time.Time, ip netip.Addr, what string, timeout time.Duration) (time.Time, error) {
	deadline := time.After(timeout)
	for {
		m.mu.Lock()
		at, ok := seen[ip]
		err := m.err
		m.mu.Unlock()
		if ok {
			return at, nil
		}
		if err != nil {
			return time.Time{}, fmt.Errorf("neighbour events: %w", err)
		}
		select {
		case <-m.kick:
		case <-deadline:
			return time.Time{}, fmt.Errorf("no neighbour entry for %s %s within %s", ip, what, timeout)
		}
	}
}

// Added is when the entry for ip first appeared.
func (m *Monitor) Added(ip netip.Addr) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	at, ok := m.added[ip]
	return at, ok
}

// Removed is when the entry for ip was first deleted.
func (m *Monitor) Removed(ip netip.Addr) (time.Time, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	at, ok := m.removed[ip]
	return at, ok
}

// Err is the first error of the subscription (events lost), if any.
func (m *Monitor) Err() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// Close ends the subscription.
func (m *Monitor) Close() { close(m.done) }

// FDBHosts returns the remote hosts the VXLAN device's forwarding entries
// send to, with how many entries each.
func (k *Kernel) FDBHosts() (map[netip.Addr]int, error) {
	list, err := dump(func() ([]netlink.Neigh, error) { return k.h.NeighList(k.vxIdx, unix.AF_BRIDGE) })
	if err != nil {
		return nil, fmt.Errorf("list forwarding entries: %w", err)
	}
	out := map[netip.Addr]int{}
	for _, e := range list {
		if e.Flags&netlink.NTF_SELF == 0 || e.IP == nil {
			continue
		}
		if ip, ok := netip.AddrFromSlice(e.IP); ok {
			out[ip.Unmap()]++
		}
	}
	return out, nil
}
