// Package mcast is a small multicast UDP sender and receiver for the
// integration tests and benchmarks (the dnp-mcast command built into the
// test image). Datagrams carry a run id and a sequence number, so a
// receiver counts exactly what one sender sent: unique, duplicate and
// foreign datagrams.
//
// Neither side needs an interface: without one, the kernel picks it from
// the routing table, as it does for applications that do not choose.
package mcast

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
)

// magic starts every datagram.
var magic = [8]byte{'D', 'N', 'P', 'M', 'C', 'A', 'S', 'T'}

// headerLen is magic + run id (8) + sequence number (4).
const headerLen = 8 + 8 + 4

// SendConfig says what Send sends.
type SendConfig struct {
	Group netip.AddrPort // multicast group and UDP port
	Iface string         // outgoing interface; "" lets the kernel route it
	Count int            // datagrams to send
	Rate  float64        // datagrams per second
	Size  int            // UDP payload bytes (at least headerLen)
	TTL   int            // IPv4 TTL / IPv6 hop limit; 0 means 1
	Run   uint64         // run id written into every datagram
}

// Send sends cfg.Count datagrams to the group at cfg.Rate and returns how
// many it sent.
func Send(ctx context.Context, cfg SendConfig) (int, error) {
	if !cfg.Group.Addr().IsMulticast() {
		return 0, fmt.Errorf("%s is not a multicast group", cfg.Group.Addr())
	}
	if cfg.Rate <= 0 || cfg.Count < 0 {
		return 0, fmt.Errorf("invalid rate %v or count %d", cfg.Rate, cfg.Count)
	}
	size := max(cfg.Size, headerLen)
	ttl := cfg.TTL
	if ttl == 0 {
		ttl = 1
	}
	conn, err := net.ListenUDP(udpNet(cfg.Group.Addr()), nil)
	if err != nil {
		return 0, fmt.Errorf("open socket: %w", err)
	}
	defer conn.Close()
	if err := setSendOptions(conn, cfg.Group.Addr(), cfg.Iface, ttl); err != nil {
		return 0, err
	}
	dst := net.UDPAddrFromAddrPort(cfg.Group)
	buf := make([]byte, size)
	copy(buf, magic[:])
	binary.BigEndian.PutUint64(buf[8:], cfg.Run)
	interval := time.Duration(float64(time.Second) / cfg.Rate)
	start := time.Now()
	for i := range cfg.Count {
		// Paced against the start time: a late wake-up does not slow the
		// average rate down.
		if wait := time.Until(start.Add(time.Duration(i) * interval)); wait > 0 {
			select {
			case <-ctx.Done():
				return i, ctx.Err()
			case <-time.After(wait):
			}
		}
		binary.BigEndian.PutUint32(buf[16:], uint32(i))
		if _, err := conn.WriteToUDP(buf, dst); err != nil {
			return i, fmt.Errorf("send datagram %d to %s: %w", i, cfg.Group, err)
		}
	}
	return cfg.Count, nil
}

// RecvConfig says what Receive listens for.
type RecvConfig struct {
	Group netip.AddrPort // multicast group and UDP port
	Iface string         // interface to join on; "" lets the kernel route it
	// Expect ends the receive once this many unique datagrams arrived
	// (0: run until Timeout or Idle).
	Expect  int
	Timeout time.Duration // overall limit
	// Idle ends the receive this long after the last datagram (0: never).
	Idle time.Duration
	Run  uint64 // count only datagrams of this run id (0: any)
}

// Result is what a receiver saw.
type Result struct {
	Unique     int    `json:"unique"`     // distinct sequence numbers of the run
	Duplicates int    `json:"duplicates"` // repeats of one already seen
	Foreign    int    `json:"foreign"`    // datagrams of another run or not ours
	MaxSeq     int    `json:"max_seq"`    // highest sequence number seen (-1: none)
	Iface      string `json:"iface"`      // interface the group was joined on
}

// Join opens a socket bound to the group's port and joined to the group,
// on cfg.Iface or the interface the kernel routes the group to. It returns
// the socket and the name of the interface joined.
func Join(cfg RecvConfig) (*net.UDPConn, string, error) {
	g := cfg.Group.Addr()
	if !g.IsMulticast() {
		return nil, "", fmt.Errorf("%s is not a multicast group", g)
	}
	var lc net.ListenConfig
	lc.Control = func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		})
		return errors.Join(err, serr)
	}
	// Bound to the group address: only datagrams to this group arrive.
	pc, err := lc.ListenPacket(context.Background(), udpNet(g), netip.AddrPortFrom(g, cfg.Group.Port()).String())
	if err != nil {
		return nil, "", fmt.Errorf("listen on %s: %w", cfg.Group, err)
	}
	conn := pc.(*net.UDPConn)
	ifName, err := join(conn, g, cfg.Iface)
	if err != nil {
		conn.Close()
		return nil, "", err
	}
	return conn, ifName, nil
}

// Receive reads datagrams from a socket made by Join until cfg says stop.
func Receive(ctx context.Context, conn *net.UDPConn, cfg RecvConfig) (Result, error) {
	res := Result{MaxSeq: -1}
	seen := map[uint32]bool{}
	deadline := time.Now().Add(cfg.Timeout)
	if cfg.Timeout <= 0 {
		deadline = time.Now().Add(24 * time.Hour)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	buf := make([]byte, 65536)
	for {
		d := deadline
		if idle := time.Now().Add(cfg.Idle); cfg.Idle > 0 && len(seen) > 0 && idle.Before(d) {
			d = idle
		}
		if err := conn.SetReadDeadline(d); err != nil {
			return res, err
		}
		n, _, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return res, ctx.Err()
			}
			return res, fmt.Errorf("receive: %w", err)
		}
		if n < headerLen || [8]byte(buf[:8]) != magic || (cfg.Run != 0 && binary.BigEndian.Uint64(buf[8:]) != cfg.Run) {
			res.Foreign++
			continue
		}
		seq := binary.BigEndian.Uint32(buf[16:])
		if seen[seq] {
			res.Duplicates++
			continue
		}
		seen[seq] = true
		res.Unique++
		res.MaxSeq = max(res.MaxSeq, int(seq))
		if cfg.Expect > 0 && res.Unique >= cfg.Expect {
			return res, nil
		}
	}
}

func udpNet(a netip.Addr) string {
	if a.Is4() {
		return "udp4"
	}
	return "udp6"
}

// setSendOptions sets the hop limit, turns loopback off (a sender does not
// receive its own datagrams) and sets the interface when one is given.
func setSendOptions(conn *net.UDPConn, g netip.Addr, iface string, ttl int) error {
	var idx int
	if iface != "" {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return fmt.Errorf("interface %s: %w", iface, err)
		}
		idx = ifi.Index
	}
	return sysutil.WithFD(conn, func(fd int) error {
		if g.Is4() {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_TTL, ttl); err != nil {
				return fmt.Errorf("IP_MULTICAST_TTL: %w", err)
			}
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_LOOP, 0); err != nil {
				return fmt.Errorf("IP_MULTICAST_LOOP: %w", err)
			}
			if idx != 0 {
				mreq := &unix.IPMreqn{Ifindex: int32(idx)}
				if err := unix.SetsockoptIPMreqn(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_IF, mreq); err != nil {
					return fmt.Errorf("IP_MULTICAST_IF %s: %w", iface, err)
				}
			}
			return nil
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_HOPS, ttl); err != nil {
			return fmt.Errorf("IPV6_MULTICAST_HOPS: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_LOOP, 0); err != nil {
			return fmt.Errorf("IPV6_MULTICAST_LOOP: %w", err)
		}
		if idx != 0 {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_IF, idx); err != nil {
				return fmt.Errorf("IPV6_MULTICAST_IF %s: %w", iface, err)
			}
		}
		return nil
	})
}

// join joins the group on iface, or with interface index 0 (the kernel
// routes the group to pick one), and returns the interface joined.
func join(conn *net.UDPConn, g netip.Addr, iface string) (string, error) {
	var idx int
	if iface != "" {
		ifi, err := net.InterfaceByName(iface)
		if err != nil {
			return "", fmt.Errorf("interface %s: %w", iface, err)
		}
		idx = ifi.Index
	}
	err := sysutil.WithFD(conn, func(fd int) error {
		// Only the groups this socket joined, on the interface it joined
		// them on (Linux delivers every joined group to every socket
		// bound to the port otherwise).
		if g.Is4() {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_MULTICAST_ALL, 0); err != nil {
				return fmt.Errorf("IP_MULTICAST_ALL: %w", err)
			}
			mreq := &unix.IPMreqn{Multiaddr: g.As4(), Ifindex: int32(idx)}
			if err := unix.SetsockoptIPMreqn(fd, unix.IPPROTO_IP, unix.IP_ADD_MEMBERSHIP, mreq); err != nil {
				return fmt.Errorf("join %s: %w", g, err)
			}
			return nil
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_MULTICAST_ALL, 0); err != nil {
			return fmt.Errorf("IPV6_MULTICAST_ALL: %w", err)
		}
		mreq := &unix.IPv6Mreq{Multiaddr: g.As16(), Interface: uint32(idx)}
		if err := unix.SetsockoptIPv6Mreq(fd, unix.IPPROTO_IPV6, unix.IPV6_JOIN_GROUP, mreq); err != nil {
			return fmt.Errorf("join %s: %w", g, err)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if iface != "" {
		return iface, nil
	}
	return joinedIface(g)
}

// joinedIface finds the interface that has g among its joined groups
// (what the kernel chose for an index of 0), from the calling thread's
// network namespace's /proc/net/igmp or igmp6.
func joinedIface(g netip.Addr) (string, error) {
	if g.Is4() {
		b, err := os.ReadFile("/proc/thread-self/net/igmp")
		if err != nil {
			return "", err
		}
		// "Idx Device : Count Querier" lines, each followed by indented
		// "Group Users Timer Reporter" lines; the group in hex, in the
		// byte order of the host (224.0.0.1 is 010000E0 on x86).
		a := g.As4()
		want := fmt.Sprintf("%08X", binary.NativeEndian.Uint32(a[:]))
		dev := ""
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) >= 2 && !strings.HasPrefix(line, "\t") && f[0] != "Idx":
				dev = strings.TrimSuffix(f[1], ":")
			case len(f) >= 1 && strings.HasPrefix(line, "\t") && f[0] == want:
				return dev, nil
			}
		}
		return "", nil
	}
	b, err := os.ReadFile("/proc/thread-self/net/igmp6")
	if err != nil {
		return "", err
	}
	// "Idx Device Group Users Flags Timer", the group in 32 hex digits.
	want := hex.EncodeToString(g.AsSlice())
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[2] == want {
			return f[1], nil
		}
	}
	return "", nil
}
