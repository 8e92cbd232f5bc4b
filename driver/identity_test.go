package driver

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// startMachine runs a driver for addr as the machine with id.
func startMachine(t *testing.T, s store.Store, addr, id string) (*Driver, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	d := New(Config{Store: s, Plane: newFakePlane(), HostAddr: netip.MustParseAddr(addr), MachineID: id,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			<-d.Done()
		}
	}
	t.Cleanup(stop)
	return d, stop
}

func hostID(t *testing.T, s store.Store, addr string) string {
	t.Helper()
	kv, err := s.Get(context.Background(), hostKey(addr))
	if err != nil {
		return ""
	}
	rec, err := decodeKV[hostRecord](kv)
	if err != nil {
		t.Fatal(err)
	}
	return rec.ID
}

// TestSecondMachineWithOneAddressIsRefused: a second machine registering
// the address of a live first one is refused with both named, leaves the
// first one's live key alone, also when it stops; the first machine's own
// next run takes its key over.
func TestSecondMachineWithOneAddressIsRefused(t *testing.T) {
	s := openStore(t)
	const addr = "192.0.2.1"
	first, stopFirst := startMachine(t, s, addr, "aaaa")
	eventually(t, "the first machine registers", func() bool { return hostID(t, s, addr) == "aaaa" })

	second, stopSecond := startMachine(t, s, addr, "bbbb")
	eventually(t, "the second machine is refused", func() bool { return second.Refused() != nil })
	msg := second.Refused().Error()
	for _, want := range []string{addr, "machine id aaaa", "machine id bbbb", "--advertise-addr"} {
		if !strings.Contains(msg, want) {
			t.Errorf("refusal %q does not name %q", msg, want)
		}
	}
	if first.Refused() != nil {
		t.Errorf("the first machine refuses too: %v", first.Refused())
	}
	stopSecond()
	if got := hostID(t, s, addr); got != "aaaa" {
		t.Fatalf("after the second machine stopped the live key names %q, want the first machine's", got)
	}

	// The first machine's next run, while its previous run's key is still
	// there (a kill -9 leaves it for the TTL), takes it over.
	again, _ := startMachine(t, s, addr, "aaaa")
	eventually(t, "the first machine's next run registers", func() bool { return again.id.ours() })
	if again.Refused() != nil {
		t.Fatalf("the first machine's next run is refused: %v", again.Refused())
	}
	stopFirst() // the previous run's clean stop must not delete the new run's key
	time.Sleep(50 * time.Millisecond)
	if got := hostID(t, s, addr); got != "aaaa" {
		t.Fatalf("the previous run's stop removed the new run's live key (now %q)", got)
	}
}
