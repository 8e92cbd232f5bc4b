package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Neighbour and forwarding entries in bulk. The netlink package sends one
// request and waits for its answer, and its dumps make a netlink.Neigh of
// every entry; with 100,000 remote endpoints (300,000 entries) that is
// most of the time and memory SetPeers takes. Here many requests go in one
// sendmsg on a raw rtnetlink socket of the overlay namespace, and dumps
// are read into compact entries.
//
// The kernel handles the requests of one sendmsg in order before sendmsg
// returns, and answers every request that fails with an error message
// carrying its sequence number, whether or not it asked for an ack. So
// only the last request of a sendmsg asks for an ack: once that is in,
// every failure before it is in too. A sendmsg holds no more requests
// than the receive buffer has room for answers, should all of them fail
// (the kernel drops answers that do not fit).

// entryKind is one of the kinds of entries SetPeers owns.
type entryKind uint8

const (
	// kindVXLAN: the VXLAN device's own FDB (self): MAC -> remote host,
	// also 00:00:00:00:00:00 per remote host (broadcast and unknown).
	kindVXLAN entryKind = iota + 1
	// kindBridge: a static bridge FDB entry (master): MAC on a port.
	kindBridge
	// kindNeigh: a permanent neighbour entry on the bridge: IP -> MAC.
	kindNeigh
)

// entry is one kernel entry of a kind SetPeers owns. It is comparable,
// small and without padding or pointers (quick to hash, nothing for the
// garbage collector to scan), so sets of them are maps of entries.
type entry struct {
	ip      [16]byte // kindVXLAN: the remote host; kindNeigh: the neighbour
	ifindex int32    // the VXLAN device, the bridge port, or the bridge
	mac     [6]byte
	kind    entryKind
	v4      bool // ip is an IPv4 address (in its IPv4-mapped form)
}

func vxlanEntry(vxIndex int32, mac [6]byte, host netip.Addr) entry {
	return entry{kind: kindVXLAN, ifindex: vxIndex, mac: mac, ip: host.As16(), v4: host.Is4()}
}

func bridgeEntry(portIndex int32, mac [6]byte) entry {
	return entry{kind: kindBridge, ifindex: portIndex, mac: mac}
}

func neighEntry(brIndex int32, ip netip.Addr, mac [6]byte) entry {
	return entry{kind: kindNeigh, ifindex: brIndex, mac: mac, ip: ip.As16(), v4: ip.Is4()}
}

// addr is e's IP address (invalid for kindBridge).
func (e entry) addr() netip.Addr {
	switch {
	case e.kind == kindBridge:
		return netip.Addr{}
	case e.v4:
		return netip.AddrFrom4([4]byte(e.ip[12:]))
	}
	return netip.AddrFrom16(e.ip)
}

func (e entry) String() string {
	mac := net.HardwareAddr(e.mac[:])
	switch e.kind {
	case kindVXLAN:
		return fmt.Sprintf("vxlan fdb %s dst %s", mac, e.addr())
	case kindBridge:
		return fmt.Sprintf("bridge fdb %s port %d", mac, e.ifindex)
	default:
		return fmt.Sprintf("neighbour %s lladdr %s", e.addr(), mac)
	}
}

// nlFlags are the netlink flags of a request to add e. A VXLAN MAC may
// have several destinations (the zero MAC has one per host): append to
// it. A unicast MAC has one, which a replace updates in place (append
// would leave an old destination). Bridge FDB and neighbour entries are
// replaced.
func (e entry) addFlags() uint16 {
	if e.kind == kindVXLAN && e.mac == [6]byte{} {
		return unix.NLM_F_CREATE | unix.NLM_F_APPEND
	}
	return unix.NLM_F_CREATE | unix.NLM_F_REPLACE
}

const (
	nlmsgHdrLen = unix.NLMSG_HDRLEN // 16
	ndmsgLen    = 12
	// maxEntryMsg is the longest request for an entry: header, ndmsg, an
	// IPv6 NDA_DST and NDA_LLADDR.
	maxEntryMsg = nlmsgHdrLen + ndmsgLen + 4 + 16 + 4 + 8
)

// appendMsg appends the request to add (or delete) e to b.
func (e entry) appendMsg(b []byte, del bool, seq uint32) []byte {
	typ, flags := uint16(unix.RTM_NEWNEIGH), unix.NLM_F_REQUEST|e.addFlags()
	if del {
		typ, flags = unix.RTM_DELNEIGH, unix.NLM_F_REQUEST
	}
	var family, ntf uint8
	var state uint16
	switch e.kind {
	case kindVXLAN:
		family, ntf, state = unix.AF_BRIDGE, unix.NTF_SELF, unix.NUD_PERMANENT
	case kindBridge:
		family, ntf, state = unix.AF_BRIDGE, unix.NTF_MASTER, unix.NUD_NOARP
	case kindNeigh:
		family, state = unix.AF_INET6, unix.NUD_PERMANENT
		if e.v4 {
			family = unix.AF_INET
		}
	}
	start := len(b)
	ne := binary.NativeEndian
	b = ne.AppendUint32(b, 0) // length, below
	b = ne.AppendUint16(b, typ)
	b = ne.AppendUint16(b, flags)
	b = ne.AppendUint32(b, seq)
	b = ne.AppendUint32(b, 0) // port id: the kernel's
	// struct ndmsg
	b = append(b, family, 0, 0, 0)
	b = ne.AppendUint32(b, uint32(e.ifindex))
	b = ne.AppendUint16(b, state)
	b = append(b, ntf, 0)
	if e.kind != kindBridge {
		if e.v4 {
			b = appendAttr(b, unix.NDA_DST, e.ip[12:])
		} else {
			b = appendAttr(b, unix.NDA_DST, e.ip[:])
		}
	}
	b = appendAttr(b, unix.NDA_LLADDR, e.mac[:])
	ne.PutUint32(b[start:], uint32(len(b)-start))
	return b
}

func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(4+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// nlSocket is a raw rtnetlink socket in one network namespace.
type nlSocket struct {
	fd  int
	seq uint32
	// Per sendmsg: at most maxReqs requests in at most maxBytes.
	maxReqs, maxBytes int
	rbuf              []byte
}

const (
	// nlBufSize is the send and receive buffer size asked for.
	nlBufSize = 4 << 20
	// nlAnswerSize bounds what one answer (an ack or error message
	// without the request: NETLINK_CAP_ACK) takes of the receive buffer,
	// kernel overhead included (under 1 KiB), with room to spare.
	nlAnswerSize = 2048
)

// openNL opens a raw rtnetlink socket in ns.
func openNL(ns netns.NsHandle) (*nlSocket, error) {
	fd, err := socketIn(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	s := &nlSocket{fd: fd, rbuf: make([]byte, 64<<10)}
	if err := s.setup(); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	return s, nil
}

func (s *nlSocket) setup() error {
	for _, o := range []struct{ force, plain int }{
		{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF},
		{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF},
	} {
		if unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, o.force, nlBufSize) != nil {
			// Without CAP_NET_ADMIN: as much as net.core.[rw]mem_max allow.
			if err := unix.SetsockoptInt(s.fd, unix.SOL_SOCKET, o.plain, nlBufSize); err != nil {
				return err
			}
		}
	}
	// Error messages without a copy of the failed request.
	if err := unix.SetsockoptInt(s.fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1); err != nil {
		return err
	}
	tv := unix.NsecToTimeval(opTimeout.Nanoseconds())
	for _, o := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
		if err := unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, o, &tv); err != nil {
			return err
		}
	}
	if err := unix.Bind(s.fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return err
	}
	// What the kernel granted (it doubles the value asked for, for its
	// overhead, and counts that overhead against it).
	rcv, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	if err != nil {
		return err
	}
	snd, err := unix.GetsockoptInt(s.fd, unix.SOL_SOCKET, unix.SO_SNDBUF)
	if err != nil {
		return err
	}
	s.maxReqs = max(rcv/nlAnswerSize-1, 1)
	s.maxBytes = max(snd/2, 4096)
	return nil
}

func (s *nlSocket) close() { unix.Close(s.fd) }

// socketIn opens a netlink socket in ns.
func socketIn(ns netns.NsHandle) (int, error) {
	fd := -1
	err := sysutil.InNetNSHandle(ns, ns.String(), func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		return err
	})
	return fd, err
}

func (s *nlSocket) send(b []byte) error {
	for {
		err := unix.Sendto(s.fd, b, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// recv reads one datagram (one or more messages) into s.rbuf.
func (s *nlSocket) recv() ([]byte, error) {
	for {
		n, _, err := unix.Recvfrom(s.fd, s.rbuf, 0)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EAGAIN):
			return nil, fmt.Errorf("no answer from the kernel after %s", opTimeout)
		case errors.Is(err, unix.ENOBUFS):
			return nil, fmt.Errorf("answers lost (receive buffer full): %w", err)
		case err != nil:
			return nil, err
		}
		return s.rbuf[:n], nil
	}
}

// nlMsg is one netlink message of a datagram.
type nlMsg struct {
	typ, flags uint16
	seq        uint32
	body       []byte
}

// nextMsg splits the first message off b.
func nextMsg(b []byte) (m nlMsg, rest []byte, err error) {
	ne := binary.NativeEndian
	if len(b) < nlmsgHdrLen {
		return m, nil, fmt.Errorf("short netlink message (%d bytes)", len(b))
	}
	l := int(ne.Uint32(b))
	if l < nlmsgHdrLen || l > len(b) {
		return m, nil, fmt.Errorf("bad netlink message length %d of %d", l, len(b))
	}
	m = nlMsg{typ: ne.Uint16(b[4:]), flags: ne.Uint16(b[6:]), seq: ne.Uint32(b[8:]), body: b[nlmsgHdrLen:l]}
	l = (l + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1)
	return m, b[min(l, len(b)):], nil
}

// errorCode is the error of an NLMSG_ERROR or NLMSG_DONE message (nil
// for an ack).
func (m nlMsg) errorCode() error {
	if len(m.body) < 4 {
		return nil
	}
	if code := int32(binary.NativeEndian.Uint32(m.body)); code < 0 {
		return syscall.Errno(-code)
	}
	return nil
}

// request is one queued change of a batch.
type request struct {
	e   entry
	del bool
}

// batch sends adds and deletes of entries in as few sendmsgs as the
// socket allows, in the order they are queued. It stops at the first
// failure (a delete of a missing entry is none): later requests are not
// sent.
type batch struct {
	s     *nlSocket
	buf   []byte
	reqs  []request // in buf; reqs[i] has sequence number first+i
	first uint32
	last  int // offset of the last request in buf
	// changes counts the requests done, not the deletes of entries that
	// were not there.
	changes int
	err     error
}

func newBatch(s *nlSocket) *batch { return &batch{s: s} }

func (b *batch) add(e entry) { b.queue(e, false) }
func (b *batch) del(e entry) { b.queue(e, true) }

func (b *batch) queue(e entry, del bool) {
	if b.err != nil {
		return
	}
	if len(b.reqs) == 0 {
		b.first = b.s.seq + 1
	}
	b.s.seq++
	b.last = len(b.buf)
	b.buf = e.appendMsg(b.buf, del, b.s.seq)
	b.reqs = append(b.reqs, request{e: e, del: del})
	if len(b.reqs) >= b.s.maxReqs || len(b.buf)+maxEntryMsg > b.s.maxBytes {
		b.flush()
	}
}

// flush sends what is queued and collects the answers; it returns the
// first failure of the batch so far.
func (b *batch) flush() error {
	if b.err != nil || len(b.reqs) == 0 {
		return b.err
	}
	defer func() { b.buf, b.reqs = b.buf[:0], b.reqs[:0] }()
	// The last request asks for an ack: its answer comes after all others.
	flags := binary.NativeEndian.Uint16(b.buf[b.last+6:])
	binary.NativeEndian.PutUint16(b.buf[b.last+6:], flags|unix.NLM_F_ACK)
	if err := b.s.send(b.buf); err != nil {
		b.err = fmt.Errorf("send %d requests: %w", len(b.reqs), err)
		return b.err
	}
	last := uint32(len(b.reqs) - 1)
	failed := 0
	for done := false; !done; {
		data, err := b.s.recv()
		if err != nil {
			b.err = err
			return b.err
		}
		for len(data) > 0 {
			var m nlMsg
			if m, data, err = nextMsg(data); err != nil {
				b.err = err
				return b.err
			}
			i := m.seq - b.first
			if m.typ != unix.NLMSG_ERROR || i > last {
				continue // not an answer to this batch
			}
			if err := m.errorCode(); err != nil {
				failed++
				r := b.reqs[i]
				switch {
				case r.del && errors.Is(err, unix.ENOENT):
				case r.del:
					b.err = firstErr(b.err, fmt.Errorf("delete %s: %w", r.e, err))
				default:
					b.err = firstErr(b.err, fmt.Errorf("add %s: %w", r.e, err))
				}
			}
			done = done || i == last
		}
	}
	b.changes += len(b.reqs) - failed
	return b.err
}

// firstErr returns the first non-nil error.
func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// neighMsg is an entry of a neighbour or FDB dump.
type neighMsg struct {
	family  uint8
	ifindex int32
	state   uint16
	flags   uint8
	mac     [6]byte
	hasMAC  bool
	ip      netip.Addr // NDA_DST, unmapped
}

// dump returns the entries keep makes of the kernel's neighbour entries of
// family (AF_BRIDGE: the FDB). An interrupted dump (the table changed
// meanwhile) is taken again.
func (s *nlSocket) dump(family uint8, keep func(m neighMsg) (entry, bool)) ([]entry, error) {
	for try := 0; ; try++ {
		out, intr, err := s.dumpOnce(family, keep)
		if err != nil || !intr {
			return out, err
		}
		if try == 5 {
			return nil, errors.New("dump interrupted 6 times: the table keeps changing")
		}
	}
}

func (s *nlSocket) dumpOnce(family uint8, keep func(m neighMsg) (entry, bool)) (out []entry, intr bool, err error) {
	s.seq++
	seq := s.seq
	ne := binary.NativeEndian
	req := ne.AppendUint32(nil, nlmsgHdrLen+ndmsgLen)
	req = ne.AppendUint16(req, unix.RTM_GETNEIGH)
	req = ne.AppendUint16(req, unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	req = ne.AppendUint32(req, seq)
	req = ne.AppendUint32(req, 0)
	req = append(req, family)
	req = append(req, make([]byte, ndmsgLen-1)...)
	if err := s.send(req); err != nil {
		return nil, false, fmt.Errorf("dump: %w", err)
	}
	for {
		data, err := s.recv()
		if err != nil {
			return nil, false, fmt.Errorf("dump: %w", err)
		}
		for len(data) > 0 {
			var m nlMsg
			if m, data, err = nextMsg(data); err != nil {
				return nil, false, fmt.Errorf("dump: %w", err)
			}
			if m.seq != seq {
				continue
			}
			if m.flags&unix.NLM_F_DUMP_INTR != 0 {
				intr = true
			}
			switch m.typ {
			case unix.NLMSG_DONE:
				if err := m.errorCode(); err != nil {
					return nil, false, fmt.Errorf("dump: %w", err)
				}
				return out, intr, nil
			case unix.NLMSG_ERROR:
				err := m.errorCode()
				if err == nil {
					err = errors.New("unexpected ack")
				}
				return nil, false, fmt.Errorf("dump: %w", err)
			case unix.RTM_NEWNEIGH:
				if nm, ok := parseNeigh(m.body); ok {
					if e, ok := keep(nm); ok {
						out = append(out, e)
					}
				}
			}
		}
	}
}

// parseNeigh reads an RTM_NEWNEIGH message body.
func parseNeigh(b []byte) (neighMsg, bool) {
	var m neighMsg
	if len(b) < ndmsgLen {
		return m, false
	}
	ne := binary.NativeEndian
	m.family = b[0]
	m.ifindex = int32(ne.Uint32(b[4:]))
	m.state = ne.Uint16(b[8:])
	m.flags = b[10]
	for a := b[ndmsgLen:]; len(a) >= 4; {
		l := int(ne.Uint16(a))
		if l < 4 || l > len(a) {
			break
		}
		data := a[4:l]
		switch ne.Uint16(a[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER) {
		case unix.NDA_DST:
			if ip, ok := netip.AddrFromSlice(data); ok {
				m.ip = ip.Unmap()
			}
		case unix.NDA_LLADDR:
			if len(data) == 6 {
				m.mac, m.hasMAC = [6]byte(data), true
			}
		}
		a = a[min((l+3)&^3, len(a)):]
	}
	return m, true
}
