package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestSameAdvertiseAddress: two machines with one advertise address, as
// NAT'ed VMs that all default to the same default-route address. h2's
// plugin is started with h1's address. It refuses to work, with an error
// naming the address and both machines; h1's live key stays through h2's
// plugin start and clean stop, and h1 keeps working; h1's own plugin,
// killed and restarted, takes its live key over at once.
func TestSameAdvertiseAddress(t *testing.T) {
	c := harness.New(t, 2, harness.Options{})
	url, st := kvServer(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	h1, h2 := c.Hosts[0], c.Hosts[1]
	p1 := startPlugin(t, c, h1, url)
	relNetCreate(t, h1)
	a1 := runContainer(t, h1, "a1", "blue")
	lost := watchHostKey(t, st, h1.UnderlayIP)

	p2 := startPlugin(t, c, h2, url, "--advertise-addr", h1.UnderlayIP)
	err := relTryNetCreate(h2)
	id1, id2 := machineID(t, h1), machineID(t, h2)
	if err == nil {
		t.Errorf("h2's plugin, with h1's advertise address %s, created a network", h1.UnderlayIP)
	} else {
		for _, s := range []string{h1.UnderlayIP, id1, id2, "--advertise-addr"} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("h2's refusal does not name %q: %v", s, err)
			}
		}
		t.Logf("h2 refused: %v", err)
	}
	if log, _ := os.ReadFile(p2.Log); !strings.Contains(string(log), "level=ERROR") || !strings.Contains(string(log), id1) {
		t.Errorf("h2's plugin logged no error naming h1's machine id %s:\n%s", id1, tail(string(log), 3000))
	}

	p2.Stop()
	if why := lost(); why != "" {
		t.Errorf("h2's plugin took h1's live key and its clean stop deleted it: %s", why)
	}
	kv, err := st.Get(t.Context(), driver.HostKey(h1.UnderlayIP))
	if err != nil || !strings.Contains(string(kv.Value), id1) {
		t.Errorf("h1's live key after h2's plugin stopped: %s, %v; want h1's machine id %s", kv.Value, err, id1)
	}
	b1 := runContainer(t, h1, "b1", "blue")
	pingEventually(t, h1, "b1", a1)

	// h1's own restart (kill -9, back within the TTL) takes its key over
	// without the key ever going missing.
	lost = watchHostKey(t, st, h1.UnderlayIP)
	p1.Crash(t)
	p1.Start(t)
	runContainer(t, h1, "c1", "blue")
	pingEventually(t, h1, "c1", b1)
	if why := lost(); why != "" {
		t.Errorf("h1's live key went missing across its plugin's restart: %s", why)
	}
}

// machineID is the machine identity h's legacy plugin keeps in its state
// directory.
func machineID(t *testing.T, h *harness.Host) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.Dir, "state", "machine-id"))
	if err != nil {
		t.Errorf("machine id of %s: %v", h.Name, err)
		return "(no machine id)"
	}
	return strings.TrimSpace(string(b))
}
