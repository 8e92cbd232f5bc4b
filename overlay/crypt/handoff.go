package crypt

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
)

// Make-before-break. A data path started with Config.Takeover while
// another one serves the control socket takes that one's packets over
// instead of starting from nothing:
//
//  1. it asks the running one (the predecessor) for a handoff; the
//     predecessor replies with its status and, with the reply, its TUN
//     device and UDP socket (SCM_RIGHTS), and from then on refuses
//     changes (a client connects again and finds the new one);
//  2. the new one takes up the state the predecessor saved and starts
//     carrying packets on the same TUN device and socket: for a moment
//     both read from them, and each packet goes to one of the two, which
//     both handle alike (same keys; each sender uses key ids of its own);
//  3. it tells the predecessor to stop, and once the predecessor has
//     closed the connection, moves its control socket (made next to the
//     old one) over the old path.
//
// The TUN device, its route and the UDP socket never go away, so no
// packet is lost: what arrives while neither reads waits in their queues.
// A predecessor whose successor goes away before step 3 carries on as if
// nothing happened. One that cannot hand over (another address or port, or
// a data path too old to know how) is stopped first instead.

// predecessor is the running data path a new one takes over from.
type predecessor struct {
	conn    *net.UnixConn
	status  Status
	tun     *os.File
	udp     *net.UDPConn
	adopted bool // the new data path owns tun and udp
}

// takeOver asks the data path at cfg.Control for its packets. If it
// cannot hand them over, it is stopped, and takeOver returns nil once it
// is gone.
func takeOver(log *slog.Logger, cfg Config) (*predecessor, error) {
	c, err := net.DialTimeout("unix", cfg.Control, callTimeout)
	if err != nil {
		return nil, fmt.Errorf("take over from the running data path: %w", err)
	}
	conn := c.(*net.UnixConn)
	conn.SetDeadline(time.Now().Add(callTimeout))
	resp, fds, err := requestFDs(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("take over from the running data path: %w", err)
	}
	switch {
	case resp.Error != "" && !strings.Contains(resp.Error, "unknown op"):
		closeFDs(fds)
		conn.Close()
		return nil, fmt.Errorf("take over from the running data path: %s", resp.Error)
	case resp.Error != "" || resp.Status == nil || len(fds) != 2:
		closeFDs(fds)
		log.Info("the running data path cannot hand its packets over (an older version); stopping it first")
		return nil, stopAndWait(conn, cfg)
	case resp.Status.Local != cfg.Local || resp.Status.Port != cfg.Port:
		closeFDs(fds)
		log.Info("the running data path has another address or port; stopping it first",
			"local", resp.Status.Local, "port", resp.Status.Port)
		return nil, stopAndWait(conn, cfg)
	}
	tun := os.NewFile(uintptr(fds[0]), TUNName)
	f := os.NewFile(uintptr(fds[1]), "udp")
	pc, err := net.FilePacketConn(f) // a copy of the descriptor
	f.Close()
	udp, ok := pc.(*net.UDPConn)
	if err != nil || !ok {
		tun.Close()
		if pc != nil {
			pc.Close()
		}
		conn.Close()
		return nil, fmt.Errorf("take over from the running data path: its UDP socket: %v", err)
	}
	return &predecessor{conn: conn, status: *resp.Status, tun: tun, udp: udp}, nil
}

// requestFDs sends the handoff request and reads the reply line and the
// descriptors that come with it.
func requestFDs(conn *net.UnixConn) (response, []int, error) {
	var resp response
	if _, err := conn.Write([]byte(`{"op":"` + opHandoff + `"}` + "\n")); err != nil {
		return resp, nil, err
	}
	var line []byte
	var got []int
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(2*4))
	for !bytes.Contains(line, []byte{'\n'}) {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if oobn > 0 {
			msgs, perr := unix.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				if rights, err := unix.ParseUnixRights(&m); err == nil {
					got = append(got, rights...)
				}
			}
			if perr != nil {
				closeFDs(got)
				return resp, nil, perr
			}
		}
		if err != nil || n == 0 {
			closeFDs(got)
			if err == nil {
				err = errors.New("connection closed")
			}
			return resp, nil, err
		}
		line = append(line, buf[:n]...)
	}
	line = line[:bytes.IndexByte(line, '\n')]
	if err := json.Unmarshal(line, &resp); err != nil {
		closeFDs(got)
		return resp, nil, fmt.Errorf("bad response: %w", err)
	}
	return resp, got, nil
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// stopAndWait tells the data path on conn to stop and waits until it is
// gone: its connection closed and its TUN device in cfg.CryptNetNS gone.
func stopAndWait(conn *net.UnixConn, cfg Config) error {
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(callTimeout))
	conn.Write([]byte(`{"op":"` + opStop + `"}` + "\n"))
	readToEOF(conn)
	for deadline := time.Now().Add(10 * time.Second); tunExists(cfg.CryptNetNS); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return errors.New("the running data path did not stop within 10s")
		}
	}
	return nil
}

// readToEOF reads conn until it ends (or its deadline passes).
func readToEOF(conn net.Conn) {
	buf := make([]byte, 4096)
	for {
		if _, err := conn.Read(buf); err != nil {
			return
		}
	}
}

// tunExists reports whether the data path's TUN device exists in the
// namespace at path ("" = this one).
func tunExists(path string) bool {
	ns := netns.None()
	if path != "" {
		var err error
		if ns, err = netns.GetFromPath(path); err != nil {
			return false
		}
		defer ns.Close()
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return false
	}
	defer h.Close()
	_, err = h.LinkByName(TUNName)
	return err == nil
}

// finish tells the predecessor to stop, waits until it has closed the
// connection, and moves this data path's control socket from next to
// control.
func (p *predecessor) finish(next, control string) error {
	p.adopted = true
	p.conn.SetDeadline(time.Now().Add(callTimeout))
	if _, err := p.conn.Write([]byte(`{"op":"` + opStop + `"}` + "\n")); err != nil {
		return fmt.Errorf("stop the data path that ran: %w", err)
	}
	readToEOF(p.conn)
	p.conn.Close()
	if err := os.Rename(next, control); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	return nil
}

// close lets go of the predecessor: if this data path did not take its
// packets over after all, the predecessor carries on.
func (p *predecessor) close() {
	p.conn.Close()
	if !p.adopted {
		p.tun.Close()
		p.udp.Close()
	}
}

// handOff sends this data path's TUN device and UDP socket, with its
// status, to a data path that takes over; from then on changes are
// refused.
func (d *dataPath) handOff(conn *net.UnixConn) error {
	d.mu.Lock()
	if d.handedOff {
		d.mu.Unlock()
		b, _ := json.Marshal(response{Error: "already handing over to another data path"})
		conn.Write(append(b, '\n'))
		return errors.New("already handing over")
	}
	d.handedOff = true
	st := d.status(d.tab.Load())
	d.mu.Unlock()
	b, _ := json.Marshal(response{VNIs: len(st.VNIs), Status: st})
	b = append(b, '\n')
	var werr error
	err := sysutil.WithFD(d.tun, func(tun int) error {
		return sysutil.WithFD(d.udp, func(udp int) error {
			_, _, werr = conn.WriteMsgUnix(b, unix.UnixRights(tun, udp), nil)
			return nil
		})
	})
	if err == nil {
		err = werr
	}
	if err != nil {
		d.takeBack()
		return err
	}
	d.log.Info("handing the packets over to a new data path")
	return nil
}

// takeBack makes the data path itself again after a handoff that did not
// finish (the one taking over went away before telling it to stop).
func (d *dataPath) takeBack() {
	d.mu.Lock()
	was := d.handedOff
	d.handedOff = false
	d.mu.Unlock()
	if was {
		d.log.Warn("the data path taking over went away before it was done; carrying on")
	}
}

// removeIfSame removes the socket at path if it is still the one this data
// path made (inode ino): a successor may have moved its own there.
func removeIfSame(path string, ino uint64) {
	var st unix.Stat_t
	if unix.Lstat(path, &st) == nil && st.Ino == ino {
		os.Remove(path)
	}
}
