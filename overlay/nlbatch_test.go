package overlay

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestBatch: requests spread over several sendmsgs all reach the kernel;
// a failing one is reported by its entry, and nothing queued after its
// sendmsg is sent; deletes of missing entries are neither errors nor
// changes; a dump reads back exactly what is there.
func TestBatch(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	err := inNewNetNS(func() error {
		ns, err := netns.Get()
		if err != nil {
			return err
		}
		defer ns.Close()
		h, err := newHandle(ns)
		if err != nil {
			return err
		}
		defer h.Close()
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		if err := h.LinkAdd(br); err != nil {
			return err
		}
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "p0"}, PeerName: "p1"}); err != nil {
			return err
		}
		p0, err := h.LinkByName("p0")
		if err != nil {
			return err
		}
		if err := h.LinkSetMasterByIndex(p0, br.Attrs().Index); err != nil {
			return err
		}
		port := int32(p0.Attrs().Index)
		nl, err := openNL(ns)
		if err != nil {
			return err
		}
		defer nl.close()
		macN := func(i int) [6]byte { return [6]byte{2, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)} }

		// Full sendmsgs of requests that all fail: every answer fits.
		b := newBatch(nl)
		n := 3 * nl.maxReqs
		for i := range n {
			b.del(bridgeEntry(port, macN(100000+i)))
		}
		if err := b.flush(); err != nil || b.changes != 0 {
			return fmt.Errorf("%d deletes of missing entries (%d per sendmsg): %d changes, %v; want 0, nil", n, nl.maxReqs, b.changes, err)
		}

		nl.maxReqs = 10 // several sendmsgs
		b = newBatch(nl)
		for i := range 35 {
			b.add(bridgeEntry(port, macN(i)))
		}
		if err := b.flush(); err != nil || b.changes != 35 {
			return fmt.Errorf("35 adds: %d changes, %v", b.changes, err)
		}
		fdb := func() (map[entry]bool, error) {
			es, err := nl.dump(unix.AF_BRIDGE, func(m neighMsg) (entry, bool) {
				return bridgeEntry(m.ifindex, m.mac), m.ifindex == port && m.state&unix.NUD_NOARP != 0
			})
			have := map[entry]bool{}
			for _, e := range es {
				have[e] = true
			}
			return have, err
		}
		have, err := fdb()
		if err != nil {
			return err
		}
		for i := range 35 {
			if !have[bridgeEntry(port, macN(i))] {
				return fmt.Errorf("entry %d missing after adds; have %v", i, have)
			}
		}
		if len(have) != 35 {
			return fmt.Errorf("%d entries after 35 adds", len(have))
		}

		// Deletes of 5 present and 5 missing entries: 5 changes.
		b = newBatch(nl)
		for i := 30; i < 40; i++ {
			b.del(bridgeEntry(port, macN(i)))
		}
		if err := b.flush(); err != nil || b.changes != 5 {
			return fmt.Errorf("deletes: %d changes, %v; want 5, nil", b.changes, err)
		}

		// A failure in the middle of the third sendmsg: the first three
		// are done but for it, nothing after them is sent.
		b = newBatch(nl)
		for i := 100; i < 150; i++ {
			e := bridgeEntry(port, macN(i))
			if i == 123 {
				e.ifindex = 9999 // no such device
			}
			b.add(e)
		}
		err = b.flush()
		if err == nil || !errors.Is(err, unix.ENODEV) || !strings.Contains(err.Error(), "bridge fdb 02:00:00:00:00:7b port 9999") {
			return fmt.Errorf("add to a missing port: %v; want ENODEV naming 02:00:00:00:00:7b port 9999", err)
		}
		if b.changes != 29 {
			return fmt.Errorf("add to a missing port: %d changes, want 29", b.changes)
		}
		if have, err = fdb(); err != nil {
			return err
		}
		for i := 100; i < 150; i++ {
			if want := i < 130 && i != 123; have[bridgeEntry(port, macN(i))] != want {
				return fmt.Errorf("entry %d there: %v, want %v", i, !want, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
