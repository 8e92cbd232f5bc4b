package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// NetNS is a named network namespace a test made (`ip netns add`); it is
// deleted when the test ends.
type NetNS struct {
	Name string
	t    testing.TB
}

// RandomName returns prefix followed by 8 random hex digits, for names that
// must not clash with other tests running on the same machine.
func RandomName(prefix string) string {
	b := make([]byte, 4)
	rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// NewNetNS makes a throwaway network namespace named prefix plus random
// digits, with lo up. Needs root and iproute2.
func NewNetNS(t testing.TB, prefix string) *NetNS {
	t.Helper()
	NeedRoot(t)
	LookPath(t, "ip")
	n := &NetNS{Name: RandomName(prefix), t: t}
	if out, err := run("ip", "netns", "add", n.Name); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", n.Name, err, out)
	}
	t.Cleanup(func() {
		if out, err := run("ip", "netns", "del", n.Name); err != nil {
			t.Errorf("ip netns del %s: %v: %s", n.Name, err, out)
		}
	})
	n.IP("link", "set", "lo", "up")
	return n
}

// Path is the namespace's file, for setns or nsenter --net=.
func (n *NetNS) Path() string { return "/run/netns/" + n.Name }

// Exec runs a command inside the namespace (`ip netns exec`) and returns
// its combined output. It gives up after 30 seconds.
func (n *NetNS) Exec(args ...string) (string, error) {
	return run("ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// MustExec is Exec that fails the test on error.
func (n *NetNS) MustExec(args ...string) string {
	n.t.Helper()
	out, err := n.Exec(args...)
	if err != nil {
		n.t.Fatalf("in netns %s: %s: %v: %s", n.Name, strings.Join(args, " "), err, out)
	}
	return out
}

// IP runs `ip -n NAME args...` and fails the test on error.
func (n *NetNS) IP(args ...string) string {
	n.t.Helper()
	out, err := run("ip", append([]string{"-n", n.Name}, args...)...)
	if err != nil {
		n.t.Fatalf("ip -n %s %s: %v: %s", n.Name, strings.Join(args, " "), err, out)
	}
	return out
}

// UnderlayDev is the name of each host's underlay interface.
const UnderlayDev = "ul0"

// Underlay is a set of "hosts" (network namespaces) on one L2 underlay: a
// bridge in its own namespace with a veth to each host. Host i has address
// 192.168.250.(i+1)/24 on UnderlayDev; those addresses exist only inside
// these namespaces.
type Underlay struct {
	Bridge *NetNS
	Hosts  []*NetNS
	Addrs  []netip.Addr
}

// NewUnderlay makes an underlay with n hosts (at most 200), removed when
// the test ends.
func NewUnderlay(t testing.TB, n int) *Underlay {
	t.Helper()
	if n < 1 || n > 200 {
		t.Fatalf("NewUnderlay: %d hosts, want 1..200", n)
	}
	u := &Underlay{Bridge: NewNetNS(t, "tul")}
	u.Bridge.IP("link", "add", "br0", "type", "bridge")
	u.Bridge.IP("link", "set", "br0", "up")
	for i := range n {
		h := NewNetNS(t, fmt.Sprintf("th%d", i+1))
		port := fmt.Sprintf("h%d", i+1)
		u.Bridge.IP("link", "add", port, "type", "veth", "peer", "name", UnderlayDev, "netns", h.Name)
		u.Bridge.IP("link", "set", port, "master", "br0", "up")
		addr := netip.AddrFrom4([4]byte{192, 168, 250, byte(i + 1)})
		h.IP("addr", "add", addr.String()+"/24", "dev", UnderlayDev)
		h.IP("link", "set", UnderlayDev, "up")
		u.Hosts = append(u.Hosts, h)
		u.Addrs = append(u.Addrs, addr)
	}
	return u
}

func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}
