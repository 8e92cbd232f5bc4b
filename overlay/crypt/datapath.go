package crypt

import (
	"bufio"
	"context"
	"crypto/ecdh"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/internal/checksum"
	"github.com/dnplabs/docker-net-plugin/internal/sysutil"
)

// Config is what one data path process needs. It runs one per host.
type Config struct {
	// HostNetNS is the path of the host network namespace, where the
	// encrypted packets' UDP socket is; empty: the process's own.
	HostNetNS string `json:"host_netns,omitempty"`
	// CryptNetNS is the path of the namespace holding the VXLAN sockets
	// of the encrypted overlays, where the data path makes its TUN device.
	CryptNetNS string `json:"crypt_netns"`
	// Local is this host's underlay address: the UDP socket's, and the
	// one the VXLAN sockets in CryptNetNS send from.
	Local netip.Addr `json:"local"`
	// Port is the UDP port of encrypted packets, the same on every host.
	Port int `json:"port"`
	// KeyFile holds this host's private key (LoadOrCreateKey); PSKFile an
	// optional pre-shared secret (LoadPSK).
	KeyFile string `json:"key_file"`
	PSKFile string `json:"psk_file,omitempty"`
	// RekeyInterval is the length of an epoch; the same on every host.
	RekeyInterval time.Duration `json:"rekey_interval"`
	// Control is the path of the control socket.
	Control string `json:"control"`
	// StateFile, if set, keeps what the data path was told (VNIs, their
	// members, hosts' public keys: nothing secret), so that a data path
	// started again carries traffic at once, before the plugin tells it
	// anything.
	StateFile string `json:"state_file,omitempty"`
	// LogLevel is debug, info, warn or error (empty: info); the log goes
	// to stderr. Log, if set, is used instead.
	LogLevel string       `json:"log_level,omitempty"`
	Log      *slog.Logger `json:"-"`
	// Takeover: if a data path already serves Control, take its TUN
	// device and UDP socket over and make it exit once this one carries
	// packets (make-before-break: no packet is lost), instead of leaving
	// it be (Run then returns ErrRunning).
	Takeover bool `json:"takeover,omitempty"`
	// Tag is an opaque label from whoever starts the data path; Status
	// reports it (to tell which one runs).
	Tag string `json:"tag,omitempty"`
}

// ConfigEnv is the environment variable RunFromEnv reads its Config from,
// as JSON.
const ConfigEnv = "DNP_CRYPT_CONFIG"

// RunFromEnv runs the data path with the Config in $DNP_CRYPT_CONFIG. A
// data path that finds another one running returns nil at once.
func RunFromEnv(ctx context.Context) error {
	var cfg Config
	if err := json.Unmarshal([]byte(os.Getenv(ConfigEnv)), &cfg); err != nil {
		return fmt.Errorf("encryption data path: $%s: %w", ConfigEnv, err)
	}
	var lv slog.Level
	if cfg.LogLevel != "" {
		if err := lv.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
			return fmt.Errorf("encryption data path: log level %q: %w", cfg.LogLevel, err)
		}
	}
	cfg.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lv})).With("component", "crypt", "pid", os.Getpid())
	err := Run(ctx, cfg)
	if errors.Is(err, ErrRunning) {
		cfg.Log.Info("another encryption data path is running; exiting")
		return nil
	}
	return err
}

// dataPathNice is the data path's scheduling priority (nice value) where
// it cannot have a real-time one.
const dataPathNice = -10

// raisePriority lets the data path run before ordinary work on a busy
// host, as the kernel's own packet processing (softirq) does: packets wait
// for it, in both directions. First choice is the lowest real-time
// priority (SCHED_RR 1: it preempts ordinary tasks at once; the kernel
// keeps 5% of every CPU for them even then), else nice -10. Both are best
// effort (they need CAP_SYS_NICE) and apply to every thread there is now;
// threads the Go runtime makes later inherit them.
func (d *dataPath) raisePriority() {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		d.log.Debug("cannot raise the data path's priority", "err", err)
		return
	}
	rt := true
	for _, tk := range tasks {
		tid, err := strconv.Atoi(tk.Name())
		if err != nil {
			continue
		}
		if err := unix.SchedSetAttr(tid, &unix.SchedAttr{Policy: unix.SCHED_RR, Priority: 1}, 0); err != nil {
			rt = false
			break
		}
	}
	if rt {
		d.log.Info("data path runs at real-time priority (SCHED_RR 1)")
		return
	}
	// Nice values are per thread too: PRIO_PGRP sets every thread of the
	// process group, the data path's own (it runs in a session of its own).
	if err := unix.Setpriority(unix.PRIO_PGRP, 0, dataPathNice); err != nil {
		d.log.Info("data path runs at normal priority", "err", err)
		return
	}
	d.log.Info("data path runs at nice " + strconv.Itoa(dataPathNice))
}

// TUNName is the data path's device in the crypt namespace.
const TUNName = "dnpc0"

// VXLANPort is the UDP port of the VXLAN sockets in the crypt namespace.
const VXLANPort = 4789

// ErrRunning is returned by Run when a data path already serves Control.
var ErrRunning = errors.New("an encryption data path is already running")

// peer is a remote host the data path has a key for.
type peer struct {
	addr netip.Addr
	pub  string
	pair *Pair
}

// table is the data path's configuration; replaced whole on every change
// (copy on write) and read without locks by the packet loops.
type table struct {
	peers map[netip.Addr]*peer
	vnis  map[uint32]map[netip.Addr]bool
}

type dataPath struct {
	cfg      Config
	log      *slog.Logger
	priv     *ecdh.PrivateKey
	psk      []byte
	instance string

	tun  *os.File
	udp  *net.UDPConn
	ln   *net.UnixListener
	stop context.CancelFunc

	mu  sync.Mutex // serializes changes of tab
	tab atomic.Pointer[table]
	// handedOff: another data path took over the packets (handoff.go);
	// changes are refused, this one only carries packets until told to
	// stop. Under mu.
	handedOff bool

	counters counters
	epochsMu sync.Mutex
	sent     map[netip.Addr][]uint32
	received map[netip.Addr][]uint32
}

// counters of packets; names as in Status.Counters.
type counters struct {
	txPackets, rxPackets, txBytes, rxBytes           atomic.Uint64
	dropNotVXLAN, dropNoKey, dropNotMember, dropSend atomic.Uint64
	dropMalformed, dropUnknownPeer, dropEpoch        atomic.Uint64
	dropAuth, dropReplay, dropWrite                  atomic.Uint64
}

func (c *counters) snapshot() map[string]uint64 {
	return map[string]uint64{
		"tx_packets": c.txPackets.Load(), "rx_packets": c.rxPackets.Load(),
		"tx_bytes": c.txBytes.Load(), "rx_bytes": c.rxBytes.Load(),
		"drop_not_vxlan": c.dropNotVXLAN.Load(), "drop_no_key": c.dropNoKey.Load(),
		"drop_not_member": c.dropNotMember.Load(), "drop_send_error": c.dropSend.Load(),
		"drop_malformed": c.dropMalformed.Load(), "drop_unknown_peer": c.dropUnknownPeer.Load(),
		"drop_epoch": c.dropEpoch.Load(), "drop_auth": c.dropAuth.Load(),
		"drop_replay": c.dropReplay.Load(), "drop_tun_write": c.dropWrite.Load(),
	}
}

// Run is the data path: it serves cfg.Control and carries packets until
// ctx ends, it is told to stop, or cfg.CryptNetNS disappears. It returns
// ErrRunning if another data path already serves cfg.Control.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if !cfg.Local.Is4() {
		return fmt.Errorf("encryption needs an IPv4 underlay address, not %v", cfg.Local)
	}
	if cfg.RekeyInterval < time.Second {
		return fmt.Errorf("rekey interval %s: want at least 1s", cfg.RekeyInterval)
	}
	d := &dataPath{cfg: cfg, log: cfg.Log, sent: map[netip.Addr][]uint32{}, received: map[netip.Addr][]uint32{}}
	d.instance = fmt.Sprintf("%016x", randomID())
	d.tab.Store(&table{peers: map[netip.Addr]*peer{}, vnis: map[uint32]map[netip.Addr]bool{}})
	var err error
	if d.priv, err = LoadOrCreateKey(cfg.KeyFile); err != nil {
		return err
	}
	if d.psk, err = LoadPSK(cfg.PSKFile); err != nil {
		return err
	}
	// The data path that runs now, if any: taken over (cfg.Takeover), or
	// left alone.
	var prev *predecessor
	if answers(cfg.Control) {
		if !cfg.Takeover {
			return ErrRunning
		}
		if prev, err = takeOver(d.log, cfg); err != nil {
			return err
		}
		defer prev.close()
	}
	var lnIno uint64
	if prev != nil {
		// Listen next to the predecessor's socket; moved over it once the
		// predecessor is gone.
		d.ln, lnIno, err = listenUnix(cfg.Control + ".next")
	} else {
		d.ln, lnIno, err = listenUnix(cfg.Control)
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	defer d.ln.Close()
	// Read after the predecessor stopped changing it.
	if err := d.load(); err != nil {
		d.log.Warn("saved state not used", "file", cfg.StateFile, "err", err)
	}
	if prev != nil {
		d.udp, d.tun = prev.udp, prev.tun
	} else {
		if d.udp, err = listenUDP(cfg.HostNetNS, netip.AddrPortFrom(cfg.Local, uint16(cfg.Port))); err != nil {
			return err
		}
		if d.tun, err = openTUN(cfg.CryptNetNS); err != nil {
			d.udp.Close()
			return err
		}
	}
	defer d.udp.Close()
	defer d.tun.Close()

	d.raisePriority()
	ctx, d.stop = context.WithCancel(ctx)
	defer d.stop()
	var wg sync.WaitGroup
	wg.Go(func() { d.serveControl(ctx) })
	wg.Go(d.send)
	wg.Go(d.receive)
	wg.Go(func() { d.watchNamespace(ctx) })
	if prev != nil {
		// Both carry packets now; the predecessor goes, and its socket
		// path becomes this one's.
		if err := prev.finish(cfg.Control+".next", cfg.Control); err != nil {
			d.log.Error("taking over from the running data path", "err", err)
			d.stop()
		} else {
			d.log.Info("took over from the data path that ran", "pid", prev.status.PID, "tag", prev.status.Tag)
		}
	}
	d.log.Info("encryption data path running", "local", cfg.Local, "port", cfg.Port,
		"rekey_interval", cfg.RekeyInterval.String(), "psk", d.psk != nil, "public_key", EncodePublic(d.priv.PublicKey()), "tag", cfg.Tag)
	<-ctx.Done()
	d.mu.Lock()
	handedOff := d.handedOff
	d.mu.Unlock()
	if !handedOff {
		// The socket path is this one's (a successor that took over
		// has its own there): remove it.
		removeIfSame(cfg.Control, lnIno)
	}
	d.ln.Close()
	d.udp.Close()
	d.tun.Close()
	wg.Wait()
	d.log.Info("encryption data path stopped")
	return nil
}

// answers reports whether a data path serves the control socket at path.
func answers(path string) bool {
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// listenUnix listens on path (replacing a dead socket there), for root
// only, and returns the inode of the socket file. Closing the listener
// leaves the file: a data path that took over may have its own socket
// there by then (removeIfSame).
func listenUnix(path string) (*net.UnixListener, uint64, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, 0, err
	}
	old := unix.Umask(0o077)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	unix.Umask(old)
	if err != nil {
		return nil, 0, err
	}
	ln.SetUnlinkOnClose(false)
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		ln.Close()
		return nil, 0, err
	}
	return ln, st.Ino, nil
}

func listenUDP(hostNS string, addr netip.AddrPort) (*net.UDPConn, error) {
	var conn *net.UDPConn
	err := sysutil.InNetNS(hostNS, func() error {
		var err error
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("encrypted packets' socket %s: %w", addr, err)
	}
	for _, buf := range []func(int) error{conn.SetReadBuffer, conn.SetWriteBuffer} {
		buf(4 << 20) // best effort
	}
	return conn, nil
}

// openTUN makes the TUN device in the crypt namespace, up, with the
// default route through it: every packet the VXLAN sockets there send
// comes to the data path. The device, and so the route, goes away when
// the data path closes it (or dies).
func openTUN(cryptNS string) (*os.File, error) {
	var f *os.File
	err := sysutil.InNetNS(cryptNS, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(TUNName)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("create %s: %w", TUNName, err)
		}
		f = os.NewFile(uintptr(fd), TUNName)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("TUN device in %s: %w", cryptNS, err)
	}
	if err := setupTUN(cryptNS); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func setupTUN(cryptNS string) error {
	ns := netns.None()
	var err error
	if cryptNS != "" {
		if ns, err = netns.GetFromPath(cryptNS); err != nil {
			return fmt.Errorf("open %s: %w", cryptNS, err)
		}
		defer ns.Close()
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", cryptNS, err)
	}
	defer h.Close()
	l, err := h.LinkByName(TUNName)
	if err != nil {
		return fmt.Errorf("find %s: %w", TUNName, err)
	}
	// Big enough for any VXLAN packet: the underlay socket fragments
	// if a user's MTU makes them bigger than the underlay's.
	if err := h.LinkSetMTU(l, 65535); err != nil {
		return fmt.Errorf("%s MTU: %w", TUNName, err)
	}
	// The TUN device drops what does not fit its queue (it never makes
	// the sender wait): room for bursts while the data path waits for a CPU.
	if err := h.LinkSetTxQLen(l, 2000); err != nil {
		return fmt.Errorf("%s queue length: %w", TUNName, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("%s up: %w", TUNName, err)
	}
	_, all, _ := net.ParseCIDR("0.0.0.0/0")
	if err := h.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: all, Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("route through %s: %w", TUNName, err)
	}
	return nil
}

// watchNamespace stops the data path once its crypt namespace is gone
// (the plugin removed the last encrypted overlay, or the host was wiped),
// or the host namespace it was given by path (tests' hosts).
func (d *dataPath) watchNamespace(ctx context.Context) {
	if d.cfg.CryptNetNS == "" {
		return
	}
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, ns := range []string{d.cfg.CryptNetNS, d.cfg.HostNetNS} {
			var st unix.Statfs_t
			if ns == "" {
				continue
			}
			if err := unix.Statfs(ns, &st); err != nil || st.Type != unix.NSFS_MAGIC {
				d.log.Info("namespace gone; stopping", "netns", ns)
				d.stop()
				return
			}
		}
	}
}

func (d *dataPath) epoch() uint32 { return Epoch(time.Now(), d.cfg.RekeyInterval) }

// note records the epoch of a key as used (sent) or accepted (received).
func (d *dataPath) note(m map[netip.Addr][]uint32, addr netip.Addr, epoch uint32) {
	d.epochsMu.Lock()
	defer d.epochsMu.Unlock()
	l := m[addr]
	if n := len(l); n > 0 && l[n-1] == epoch {
		return
	}
	l = append(l, epoch)
	if len(l) > 16 {
		l = l[len(l)-16:]
	}
	m[addr] = l
}

// batch is how many packets the data path moves per system call at most.
const batch = 64

// send carries packets from the TUN device to the remote hosts: each an
// IPv4 UDP VXLAN packet a VXLAN socket of the crypt namespace sent. It
// reads what the TUN device has queued (up to batch packets), seals it,
// and sends it with one sendmmsg.
func (d *dataPath) send() {
	senders := map[netip.Addr]*Sender{}
	bufs := make([][]byte, batch)
	lens := make([]int, batch)
	msgs := make([]ipv4.Message, batch)
	addrs := make([]net.UDPAddr, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 65536+TagSize)
		addrs[i].IP = make(net.IP, 4)
		msgs[i].Buffers = make([][]byte, 1)
		msgs[i].Addr = &addrs[i]
	}
	rc, err := d.tun.SyscallConn()
	if err != nil {
		d.log.Error("TUN", "err", err)
		d.stop()
		return
	}
	pc := ipv4.NewPacketConn(d.udp)
	for {
		n := 0
		var readErr error
		err := rc.Read(func(fd uintptr) bool {
			for n < batch {
				m, err := unix.Read(int(fd), bufs[n][:65536])
				switch {
				case err == unix.EINTR:
					continue
				case err == unix.EAGAIN:
					return n > 0 // nothing (more) queued: wait, or send what we have
				case err != nil:
					readErr = err
					return true
				}
				lens[n] = m
				n++
			}
			return true
		})
		if err == nil {
			err = readErr
		}
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				d.log.Error("read TUN", "err", err)
				d.stop()
			}
			return
		}
		k := 0
		for i := range n {
			pkt, dst, ok := d.seal(senders, bufs[i][:lens[i]])
			if !ok {
				continue
			}
			a := dst.As4()
			copy(addrs[k].IP, a[:])
			addrs[k].Port = d.cfg.Port
			msgs[k].Buffers[0] = pkt
			k++
		}
		for off := 0; off < k; {
			w, err := pc.WriteBatch(msgs[off:k], 0)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// The first message failed (e.g. no route): drop it, go on.
				d.counters.dropSend.Add(1)
				w = 1
			}
			for _, m := range msgs[off : off+w] {
				d.counters.txPackets.Add(1)
				d.counters.txBytes.Add(uint64(len(m.Buffers[0])))
			}
			off += w
		}
	}
}

// seal turns one packet from the TUN device into the encrypted packet for
// its remote host, in place; ok is false for a packet to drop.
func (d *dataPath) seal(senders map[netip.Addr]*Sender, p []byte) (pkt []byte, dst netip.Addr, ok bool) {
	n := len(p)
	// IPv4, no fragments, UDP to the VXLAN port, a VXLAN header.
	if n < 20 || p[0]>>4 != 4 || p[9] != unix.IPPROTO_UDP || binary.BigEndian.Uint16(p[6:])&0x3fff != 0 {
		d.counters.dropNotVXLAN.Add(1)
		return nil, dst, false
	}
	ihl := int(p[0]&0x0f) * 4
	total := int(binary.BigEndian.Uint16(p[2:]))
	if ihl < 20 || total > n || total < ihl+8+8 || binary.BigEndian.Uint16(p[ihl+2:]) != VXLANPort {
		d.counters.dropNotVXLAN.Add(1)
		return nil, dst, false
	}
	dst = netip.AddrFrom4([4]byte(p[16:20]))
	start := ihl + 8 // the VXLAN header
	plain := p[start:total]
	vni := binary.BigEndian.Uint32(plain[4:]) >> 8
	tab := d.tab.Load()
	if !tab.vnis[vni][dst] {
		d.counters.dropNotMember.Add(1)
		return nil, dst, false
	}
	pe := tab.peers[dst]
	if pe == nil {
		d.counters.dropNoKey.Add(1)
		return nil, dst, false
	}
	s := senders[dst]
	if s == nil || s.Pair() != pe.pair {
		s = NewSender(pe.pair)
		senders[dst] = s
	}
	before, _ := s.KeyInUse()
	pkt = s.Seal(p[start-HeaderSize:cap(p)], len(plain), d.epoch())
	if after, _ := s.KeyInUse(); after != before {
		d.note(d.sent, dst, after)
	}
	return pkt, dst, true
}

// ipUDPSize is the IPv4 and UDP header the data path puts back in front
// of a VXLAN packet it received.
const ipUDPSize = 28

// receive carries packets from remote hosts into the TUN device; it takes
// up to batch packets per recvmmsg.
func (d *dataPath) receive() {
	receivers := map[netip.Addr]*Receiver{}
	off := ipUDPSize - HeaderSize // the plaintext then starts at ipUDPSize
	bufs := make([][]byte, batch)
	msgs := make([]ipv4.Message, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 65536+ipUDPSize)
		msgs[i].Buffers = [][]byte{bufs[i][off:]}
	}
	pc := ipv4.NewPacketConn(d.udp)
	for {
		n, err := pc.ReadBatch(msgs, 0)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				d.log.Error("read UDP", "err", err)
				d.stop()
			}
			return
		}
		for i := range n {
			from, ok := msgs[i].Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			src, _ := netip.AddrFromSlice(from.IP)
			pkt, ok := d.open(receivers, bufs[i], msgs[i].N, src.Unmap())
			if !ok {
				continue
			}
			if _, err := d.tun.Write(pkt); err != nil {
				if errors.Is(err, os.ErrClosed) {
					return
				}
				d.counters.dropWrite.Add(1)
				continue
			}
			d.counters.rxPackets.Add(1)
			d.counters.rxBytes.Add(uint64(msgs[i].N))
		}
	}
}

// open checks and decrypts an encrypted packet from src (n bytes at
// buf[ipUDPSize-HeaderSize:]) and returns the VXLAN packet to write into
// the TUN device (in buf); ok is false for a packet to drop.
func (d *dataPath) open(receivers map[netip.Addr]*Receiver, buf []byte, n int, src netip.Addr) (pkt []byte, ok bool) {
	pe := d.tab.Load().peers[src]
	if pe == nil {
		d.counters.dropUnknownPeer.Add(1)
		return nil, false
	}
	r := receivers[src]
	if r == nil || r.Pair() != pe.pair {
		r = NewReceiver(pe.pair)
		r.NewKey = func(epoch uint32, _ uint64) { d.note(d.received, src, epoch) }
		receivers[src] = r
	}
	off := ipUDPSize - HeaderSize
	plain, err := r.Open(buf[off:off+n], d.epoch())
	if err != nil {
		switch {
		case errors.Is(err, ErrEpoch):
			d.counters.dropEpoch.Add(1)
		case errors.Is(err, ErrAuth):
			d.counters.dropAuth.Add(1)
		case errors.Is(err, ErrReplay):
			d.counters.dropReplay.Add(1)
		default:
			d.counters.dropMalformed.Add(1)
		}
		return nil, false
	}
	// The VXLAN header (flag I set) and an Ethernet frame; the sender
	// must be a member of the VNI.
	if len(plain) < 8+14 || plain[0]&0x08 == 0 {
		d.counters.dropMalformed.Add(1)
		return nil, false
	}
	vni := binary.BigEndian.Uint32(plain[4:]) >> 8
	if !d.tab.Load().vnis[vni][src] {
		d.counters.dropNotMember.Add(1)
		return nil, false
	}
	pkt = buf[:ipUDPSize+len(plain)]
	putIPUDP(pkt, src, d.cfg.Local)
	return pkt, true
}

// putIPUDP writes the IPv4 and UDP headers of a VXLAN packet from src to
// dst into pkt[:ipUDPSize]; the VXLAN packet follows. The UDP checksum is
// zero, as VXLAN over IPv4 allows.
func putIPUDP(pkt []byte, src, dst netip.Addr) {
	h := pkt[:20]
	h[0], h[1] = 0x45, 0
	binary.BigEndian.PutUint16(h[2:], uint16(len(pkt)))
	binary.BigEndian.PutUint32(h[4:], 0) // id, flags, fragment offset
	h[8], h[9] = 64, unix.IPPROTO_UDP
	h[10], h[11] = 0, 0
	s, t := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], t[:])
	binary.BigEndian.PutUint16(h[10:], checksum.IPv4Header(h))
	u := pkt[20:ipUDPSize]
	binary.BigEndian.PutUint16(u[0:], VXLANPort)
	binary.BigEndian.PutUint16(u[2:], VXLANPort)
	binary.BigEndian.PutUint16(u[4:], uint16(len(pkt)-20))
	binary.BigEndian.PutUint16(u[6:], 0)
}

// serveControl answers the plugin on the control socket.
func (d *dataPath) serveControl(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := d.ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				d.log.Error("control socket", "err", err)
				d.stop()
			}
			return
		}
		wg.Go(func() {
			<-ctx.Done()
			conn.Close()
		})
		go d.serveConn(conn)
	}
}

func (d *dataPath) serveConn(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	handingOff := false // this connection's peer is taking over
	defer func() {
		if handingOff {
			d.takeBack()
		}
	}()
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var req request
		var resp response
		if err := json.Unmarshal(line, &req); err != nil {
			resp.Error = "bad request: " + err.Error()
		} else if req.Op == opHandoff {
			uc, ok := conn.(*net.UnixConn)
			if !ok {
				return
			}
			if err := d.handOff(uc); err != nil {
				d.log.Warn("handing the packets over failed", "err", err)
				return
			}
			handingOff = true
			continue
		} else {
			resp = d.handle(req)
		}
		b, _ := json.Marshal(resp)
		if _, err := conn.Write(append(b, '\n')); err != nil {
			return
		}
		if req.Op == opStop && resp.Error == "" {
			handingOff = false
			d.stop()
			return
		}
	}
}

func (d *dataPath) handle(req request) response {
	d.mu.Lock()
	defer d.mu.Unlock()
	old := d.tab.Load()
	tab := &table{peers: old.peers, vnis: old.vnis}
	switch req.Op {
	case opAddVNI, opSetMembers, opRemoveVNI, opSetKeys:
		if d.handedOff {
			return response{Error: errHandedOff}
		}
	}
	switch req.Op {
	case opAddVNI, opSetMembers, opRemoveVNI:
		if req.VNI == 0 || req.VNI > 1<<24-1 {
			return response{Error: fmt.Sprintf("vni %d out of range", req.VNI)}
		}
		tab.vnis = maps.Clone(old.vnis)
		switch req.Op {
		case opAddVNI:
			if tab.vnis[req.VNI] == nil {
				tab.vnis[req.VNI] = map[netip.Addr]bool{}
				d.log.Info("carrying vni", "vni", req.VNI)
			}
		case opSetMembers:
			m := map[netip.Addr]bool{}
			for _, h := range req.Hosts {
				m[h.Unmap()] = true
			}
			tab.vnis[req.VNI] = m
			d.log.Debug("vni members", "vni", req.VNI, "hosts", req.Hosts)
		case opRemoveVNI:
			if _, ok := tab.vnis[req.VNI]; ok {
				delete(tab.vnis, req.VNI)
				d.log.Info("no longer carrying vni", "vni", req.VNI)
			}
		}
	case opSetKeys:
		tab.peers = maps.Clone(old.peers)
		for a, k := range req.Keys {
			addr, err := netip.ParseAddr(a)
			if err != nil {
				return response{Error: fmt.Sprintf("host %q: %v", a, err)}
			}
			addr = addr.Unmap()
			if p := tab.peers[addr]; p != nil && p.pub == k {
				continue // unchanged: keep the pair, and so the keys in use
			}
			pub, err := ParsePublic(k)
			if err != nil {
				return response{Error: fmt.Sprintf("host %s: %v", addr, err)}
			}
			pair, err := NewPair(d.cfg.Local, d.priv, addr, pub, d.psk)
			if err != nil {
				return response{Error: err.Error()}
			}
			tab.peers[addr] = &peer{addr: addr, pub: k, pair: pair}
			d.log.Info("host key", "host", addr, "public_key", k)
		}
	case opStatus:
		return response{VNIs: len(old.vnis), Status: d.status(old)}
	case opStop:
		d.log.Info("told to stop")
	default:
		return response{Error: fmt.Sprintf("unknown op %q", req.Op)}
	}
	d.tab.Store(tab)
	if err := d.save(tab); err != nil {
		d.log.Warn("saving state", "file", d.cfg.StateFile, "err", err)
	}
	return response{VNIs: len(tab.vnis)}
}

// savedState is what StateFile holds.
type savedState struct {
	Keys map[string]string       `json:"keys"`
	VNIs map[uint32][]netip.Addr `json:"vnis"`
}

func (d *dataPath) save(tab *table) error {
	if d.cfg.StateFile == "" {
		return nil
	}
	st := savedState{Keys: map[string]string{}, VNIs: map[uint32][]netip.Addr{}}
	for a, p := range tab.peers {
		st.Keys[a.String()] = p.pub
	}
	for vni, hosts := range tab.vnis {
		l := []netip.Addr{}
		for h := range hosts {
			l = append(l, h)
		}
		slices.SortFunc(l, func(a, b netip.Addr) int { return a.Compare(b) })
		st.VNIs[vni] = l
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := d.cfg.StateFile + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, d.cfg.StateFile)
}

// load takes up the saved state, if any.
func (d *dataPath) load() error {
	if d.cfg.StateFile == "" {
		return nil
	}
	b, err := os.ReadFile(d.cfg.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var st savedState
	if err := json.Unmarshal(b, &st); err != nil {
		return err
	}
	reqs := []request{{Op: opSetKeys, Keys: st.Keys}}
	for vni, hosts := range st.VNIs {
		reqs = append(reqs, request{Op: opAddVNI, VNI: vni}, request{Op: opSetMembers, VNI: vni, Hosts: hosts})
	}
	for _, r := range reqs {
		if resp := d.handle(r); resp.Error != "" {
			return errors.New(resp.Error)
		}
	}
	d.log.Info("took up saved state", "vnis", len(st.VNIs), "hosts", len(st.Keys))
	return nil
}

func (d *dataPath) status(tab *table) *Status {
	st := &Status{
		PID: os.Getpid(), Instance: d.instance, Tag: d.cfg.Tag, Local: d.cfg.Local, Port: d.cfg.Port,
		Interval: d.cfg.RekeyInterval.String(), Epoch: d.epoch(), PSK: d.psk != nil,
		PublicKey: EncodePublic(d.priv.PublicKey()), PSKID: PSKID(d.psk),
		VNIs: map[uint32][]string{}, Counters: d.counters.snapshot(),
	}
	for vni, hosts := range tab.vnis {
		l := []string{}
		for h := range hosts {
			l = append(l, h.String())
		}
		sort.Strings(l)
		st.VNIs[vni] = l
	}
	d.epochsMu.Lock()
	defer d.epochsMu.Unlock()
	for addr, p := range tab.peers {
		st.Peers = append(st.Peers, PeerStatus{
			Addr: addr, PublicKey: p.pub,
			SentEpochs: slices.Clone(d.sent[addr]), ReceivedEpochs: slices.Clone(d.received[addr]),
		})
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Addr.Less(st.Peers[j].Addr) })
	return st
}
