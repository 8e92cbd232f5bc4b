package testenv

import (
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/internal/checksum"
	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
)

// DoIn runs fn on a thread in the network namespace at path. The thread
// is discarded afterwards if it cannot return to its own namespace.
func DoIn(path string, fn func() error) error { return sysutil.InNetNS(path, fn) }

// Capture records every frame seen on every interface of a network
// namespace (an AF_PACKET socket, as tcpdump -i any would), for tests
// that check what crossed a wire.
type Capture struct {
	mu     sync.Mutex
	frames [][]byte
	bytes  int
	stop   chan struct{}
	done   chan struct{}
}

// captureLimit bounds the memory a Capture keeps; later frames are dropped.
const captureLimit = 256 << 20

// StartCapture starts capturing in the namespace at path until the test
// ends or Stop is called.
func StartCapture(t testing.TB, path string) *Capture {
	t.Helper()
	var fd int
	err := DoIn(path, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		return err
	})
	if err != nil {
		t.Fatalf("capture in %s: %v", path, err)
	}
	tv := unix.Timeval{Usec: 100_000}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 8<<20)
	c := &Capture{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer unix.Close(fd)
		buf := make([]byte, 65536)
		for {
			select {
			case <-c.stop:
				return
			default:
			}
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil || n <= 0 {
				continue
			}
			c.mu.Lock()
			if c.bytes+n <= captureLimit {
				c.frames = append(c.frames, bytes.Clone(buf[:n]))
				c.bytes += n
			}
			c.mu.Unlock()
		}
	}()
	t.Cleanup(c.Stop)
	return c
}

// Stop ends the capture; what was captured stays readable.
func (c *Capture) Stop() {
	select {
	case <-c.stop:
	default:
		close(c.stop)
	}
	<-c.done
}

// Frames returns a copy of the list of frames captured so far (the frames
// themselves are shared).
func (c *Capture) Frames() [][]byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([][]byte(nil), c.frames...)
}

// Count is how many captured frames contain pattern.
func (c *Capture) Count(pattern []byte) int {
	n := 0
	for _, f := range c.Frames() {
		if bytes.Contains(f, pattern) {
			n++
		}
	}
	return n
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// VXLANPacket is a VXLAN header for vni followed by an Ethernet frame
// carrying an IPv4 UDP datagram (src:srcPort -> dst:dstPort) with payload:
// what a VXLAN tunnel endpoint sends in a UDP datagram to port 4789.
func VXLANPacket(vni uint32, dstMAC, srcMAC net.HardwareAddr, src, dst netip.AddrPort, payload []byte) []byte {
	var b bytes.Buffer
	b.Write([]byte{0x08, 0, 0, 0})
	binary.Write(&b, binary.BigEndian, vni<<8)
	b.Write(dstMAC)
	b.Write(srcMAC)
	b.Write([]byte{0x08, 0x00})
	ip := make([]byte, 20)
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+8+len(payload)))
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], checksum.IPv4Header(ip))
	b.Write(ip)
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(payload)))
	b.Write(udp) // checksum 0: none
	b.Write(payload)
	return b.Bytes()
}

// SendUDP sends payload in count datagrams from a socket in the namespace
// at path to dst, a little apart.
func SendUDP(path string, dst netip.AddrPort, payload []byte, count int) error {
	return DoIn(path, func() error {
		conn, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer conn.Close()
		for range count {
			if _, err := conn.Write(payload); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	})
}
