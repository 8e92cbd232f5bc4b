package sysutil

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestInNetNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	name := fmt.Sprintf("sysutiltest%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	path := "/run/netns/" + name
	self := nsInode(t, "/proc/thread-self/ns/net")

	var in uint64
	if err := InNetNS(path, func() error { in = nsInode(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
		t.Fatal(err)
	}
	if want := nsInode(t, path); in != want {
		t.Errorf("fn ran in namespace %d, want %d (%s)", in, want, path)
	}
	if err := InNetNS("", func() error { in = nsInode(t, "/proc/thread-self/ns/net"); return nil }); err != nil {
		t.Fatal(err)
	}
	if in != self {
		t.Errorf(`InNetNS("") ran fn in namespace %d, want this one, %d`, in, self)
	}
	if err := InNetNS(path+"-missing", func() error { t.Error("fn ran without a namespace"); return nil }); err == nil {
		t.Error("InNetNS of a missing namespace: no error")
	}
	if got := nsInode(t, "/proc/thread-self/ns/net"); got != self {
		t.Errorf("the caller's thread is in namespace %d afterwards, want %d", got, self)
	}
}

func TestWithFD(t *testing.T) {
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var typ int
	err = WithFD(conn, func(fd int) error {
		var gerr error
		typ, gerr = unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
		return gerr
	})
	if err != nil || typ != unix.SOCK_DGRAM {
		t.Errorf("SO_TYPE through WithFD: %d, %v; want SOCK_DGRAM (%d)", typ, err, unix.SOCK_DGRAM)
	}
	want := errors.New("from fn")
	if err := WithFD(conn, func(int) error { return want }); err != want {
		t.Errorf("WithFD returned %v, want fn's error", err)
	}
}

// An interrupted dump is tried again, at most retries more times; any
// other error ends it at once.
func TestRetryDump(t *testing.T) {
	interruptedFor := func(n int, calls *int) func() ([]int, error) {
		return func() ([]int, error) {
			*calls++
			if *calls <= n {
				return nil, netlink.ErrDumpInterrupted
			}
			return []int{*calls}, nil
		}
	}
	calls := 0
	if got, err := RetryDump(5, interruptedFor(3, &calls)); err != nil || len(got) != 1 || calls != 4 {
		t.Errorf("interrupted 3 times, 5 retries: %v, %v after %d calls; want the 4th call's result", got, err, calls)
	}
	calls = 0
	if _, err := RetryDump(5, interruptedFor(100, &calls)); !errors.Is(err, netlink.ErrDumpInterrupted) || calls != 6 {
		t.Errorf("always interrupted, 5 retries: %v after %d calls; want ErrDumpInterrupted after 6", err, calls)
	}
	calls = 0
	other := errors.New("no such device")
	if _, err := RetryDump(5, func() (int, error) { calls++; return 0, other }); err != other || calls != 1 {
		t.Errorf("another error: %v after %d calls; want it after 1", err, calls)
	}
}
