package overlay

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
)

// Encrypted networks (NetworkConfig.Encrypted). Their VXLAN device is made
// from a namespace of its own per host, the crypt namespace
// (<dir>/<prefix>crypt), so its UDP socket lives there, not in the host
// namespace: the crypt namespace has this host's underlay address on lo
// and no way out but the TUN device of the encryption data path (package
// crypt), a process of its own that seals every VXLAN packet for the
// remote host it goes to and opens what remote hosts send. While the data
// path is not running, there is no TUN device and no route out, and the
// VXLAN packets of encrypted networks go nowhere: they never reach the
// underlay in clear. The host namespace has no VXLAN socket for their
// VNIs, and the source filter (filter.go) drops any VXLAN packet for them
// arriving in clear.
//
// The data path outlives the process that started it (a plugin restart
// does not interrupt encrypted traffic) and stops by itself once the crypt
// namespace is gone, which happens with the last encrypted network. It is
// either a child process in a session of its own (Encryption.Command), or
// runs wherever an Encryption.Runner puts it (the managed plugin: a
// container of its own, since all of a managed plugin's processes end
// with it).

// cryptID names the crypt namespace: <prefix>crypt. No network may have it.
const cryptID = "crypt"

// EncryptionOverhead is what encryption adds to each VXLAN packet on the
// underlay: an encrypted network's default MTU is this much smaller.
const EncryptionOverhead = crypt.Overhead

// ErrNoEncryption is returned for encrypted networks when the Host has no
// Encryption settings.
var ErrNoEncryption = errors.New("encryption is not set up on this host")

// Encryption is how a Host runs the data path of its encrypted networks.
type Encryption struct {
	// Command starts the data path process: a program and its arguments.
	// It must call crypt.RunFromEnv (docker-net-plugin's "crypt" command
	// does).
	Command []string
	// StateDir holds the data path's control socket.
	StateDir string
	// KeyFile is this host's private key (created if missing); PSKFile an
	// optional pre-shared secret file.
	KeyFile, PSKFile string
	// Port is the UDP port of encrypted packets (the same on every host).
	Port int
	// RekeyInterval is how long a traffic key is used (the same on every
	// host).
	RekeyInterval time.Duration
	// LogFile receives the data path's log; empty: this process's stderr.
	LogFile string
	// LogLevel of the data path ("debug", "info", ...); empty: info.
	LogLevel string
	// Runner, if set, runs the data path instead of Command.
	Runner Runner
}

// Runner runs the data path somewhere that outlives this process, for
// example as a container of its own. Its methods may take long (they may
// ask dockerd), so they are only ever called from a goroutine of their
// own, never from a plugin callback, and never with a lock held that a
// callback takes: until the data path runs, what it is to be told is
// recorded, and it is told everything once it answers (fail closed: the
// crypt namespace has no way out meanwhile).
type Runner interface {
	// Run makes sure a data path with cfg runs and answers on
	// cfg.Control. It keeps one that has these settings, and replaces
	// one with others by a new one that takes over from it
	// (crypt.Config.Takeover: make-before-break).
	Run(ctx context.Context, cfg crypt.Config) error
	// Tidy removes whatever Run left, once no encrypted network is left.
	Tidy(ctx context.Context) error
}

func (e *Encryption) control() string   { return filepath.Join(e.StateDir, "crypt.sock") }
func (e *Encryption) stateFile() string { return filepath.Join(e.StateDir, "crypt-state.json") }

// keeper runs a Host's data path and keeps it told what the Host wants:
// the VNIs of encrypted networks with their member hosts, and the hosts'
// public keys. It restarts a data path that died and tells it everything
// again.
type keeper struct {
	h   *Host
	enc *Encryption

	mu     sync.Mutex
	client *crypt.Client
	local  netip.Addr
	vnis   map[uint32][]netip.Addr // members; nil: not known yet
	keys   map[netip.Addr]string
	// checked: the running data path was found to have this keeper's
	// settings (checked once, on the first connection).
	checked bool

	// With a Runner: wake the run loop; ran: the Runner made sure the
	// data path is the one this keeper wants (reset when that changes);
	// tidy: the last encrypted network went, the Runner is to tidy up.
	wake chan struct{}
	ran  bool
	tidy bool
}

// keeper returns the Host's keeper, making it on first use.
func (h *Host) keeper() (*keeper, error) {
	h.kmu.Lock()
	defer h.kmu.Unlock()
	if h.Encryption == nil {
		return nil, ErrNoEncryption
	}
	if h.kp == nil {
		h.kp = &keeper{h: h, enc: h.Encryption, vnis: map[uint32][]netip.Addr{}, keys: map[netip.Addr]string{}}
		if h.Encryption.Runner != nil {
			h.kp.wake = make(chan struct{}, 1)
			go h.kp.runLoop()
		} else {
			go h.kp.watch()
		}
	}
	return h.kp, nil
}

func (h *Host) cryptPath() string { return filepath.Join(h.dir(), h.prefix()+cryptID) }

// SetHostKeys gives the data path the public keys (crypt.EncodePublic) of
// remote hosts, adding to or replacing those it has.
func (h *Host) SetHostKeys(keys map[netip.Addr]string) error {
	k, err := h.keeper()
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	changed := map[netip.Addr]string{}
	for a, pub := range keys {
		if k.keys[a.Unmap()] != pub {
			changed[a.Unmap()] = pub
			k.keys[a.Unmap()] = pub
		}
	}
	if len(changed) == 0 || k.client == nil {
		return nil // a data path started later gets them all
	}
	return k.call(func(c *crypt.Client) error { return c.SetKeys(changed) })
}

// StartEncryption makes sure the data path runs if encrypted networks
// exist here (their crypt namespace does), before anything else: a
// restarted plugin calls it first thing, so that a data path that died
// with the plugin carries traffic again at once (it takes up its saved
// state). local is this host's underlay address.
func (h *Host) StartEncryption(local netip.Addr) error {
	runner := h.Encryption != nil && h.Encryption.Runner != nil
	if !isNamedNS(h.cryptPath()) {
		if runner {
			// What an earlier run may have left for lack of time (it
			// stopped right after its last encrypted network went).
			k, err := h.keeper()
			if err != nil {
				return err
			}
			k.mu.Lock()
			k.tidy = true
			k.mu.Unlock()
			k.poke()
		}
		return nil
	}
	k, err := h.keeper()
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.client != nil {
		return nil
	}
	k.local = local
	if runner {
		// A data path that outlived the last run carries on and is told
		// everything now; the Runner checks in the background that it is
		// the one this run wants (or starts one).
		k.poke()
		k.start()
		return nil
	}
	return k.start()
}

// SettleEncryption does at once what is left to do after the last
// encrypted network went (with a Runner: remove what it ran). The plugin
// calls it when it stops, which may be right after.
func (h *Host) SettleEncryption(ctx context.Context) error {
	if h.Encryption == nil || h.Encryption.Runner == nil || isNamedNS(h.cryptPath()) {
		return nil
	}
	return h.Encryption.Runner.Tidy(ctx)
}

// EncryptionStatus reports the running data path's state, or an error if
// none runs.
func (h *Host) EncryptionStatus() (*crypt.Status, error) {
	if h.Encryption == nil {
		return nil, ErrNoEncryption
	}
	c, err := crypt.Dial(h.Encryption.control())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.Status()
}

// EncryptionAvailable reports whether this kernel can run the encryption
// data path: a TUN device in a namespace.
func EncryptionAvailable() error {
	err := inNewNetNS(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		defer unix.Close(fd)
		ifr, err := unix.NewIfreq("probe0")
		if err != nil {
			return err
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			return fmt.Errorf("create a TUN device: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("encrypted networks need TUN devices: %w", err)
	}
	return nil
}

// ensureCrypt makes the crypt namespace, with local on its lo, and the data
// path carrying vni (members unchanged, none if new). It returns a handle
// of the crypt namespace, which the caller closes.
func (h *Host) ensureCrypt(local netip.Addr, vni uint32) (netns.NsHandle, error) {
	k, err := h.keeper()
	if err != nil {
		return netns.None(), err
	}
	ns, _, err := ensureNamedNS(h.cryptPath())
	if err != nil {
		return netns.None(), fmt.Errorf("crypt namespace: %w", err)
	}
	if err := setupCryptNS(ns, local); err != nil {
		ns.Close()
		return netns.None(), fmt.Errorf("crypt namespace: %w", err)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.local != local && k.client != nil {
		// The underlay address changed: reconnect, and start() restarts
		// the data path with the new one.
		k.client.Close()
		k.client = nil
	}
	if k.local != local {
		k.ran, k.checked = false, false
	}
	k.local = local
	if _, ok := k.vnis[vni]; !ok {
		k.vnis[vni] = nil
	}
	if err := k.call(func(c *crypt.Client) error { return c.AddVNI(vni) }); err != nil {
		ns.Close()
		return netns.None(), err
	}
	return ns, nil
}

// setupCryptNS puts lo up with local on it and nothing else.
func setupCryptNS(ns netns.NsHandle, local netip.Addr) error {
	h, err := newHandle(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	if err := setUp(h, "lo"); err != nil {
		return err
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	addrs, err := dump(func() ([]netlink.Addr, error) { return h.AddrList(lo, netlink.FAMILY_V4) })
	if err != nil {
		return fmt.Errorf("list addresses: %w", err)
	}
	have := false
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		switch ip = ip.Unmap(); {
		case ip == local:
			have = true
		case ip.IsLoopback():
		default:
			if err := h.AddrDel(lo, &a); err != nil {
				return fmt.Errorf("remove old address %s: %w", ip, err)
			}
		}
	}
	if !have {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: local.AsSlice(), Mask: net.CIDRMask(32, 32)}}
		if err := h.AddrAdd(lo, a); err != nil {
			return fmt.Errorf("add %s to lo: %w", local, err)
		}
	}
	return nil
}

// cryptSetMembers tells the data path the member hosts of vni.
func (h *Host) cryptSetMembers(vni uint32, hosts []netip.Addr) (int, error) {
	k, err := h.keeper()
	if err != nil {
		return 0, err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if old, ok := k.vnis[vni]; ok && old != nil && slices.Equal(old, hosts) {
		return 0, nil
	}
	k.vnis[vni] = slices.Clone(hosts)
	if k.vnis[vni] == nil {
		k.vnis[vni] = []netip.Addr{}
	}
	return 1, k.call(func(c *crypt.Client) error { return c.SetMembers(vni, hosts) })
}

// cryptUpdateMembers adds hosts to and removes hosts from the members of
// vni, the others staying, and tells the data path the new members if
// that changes them. The members must be known (cryptSetMembers ran).
func (h *Host) cryptUpdateMembers(vni uint32, add, remove []netip.Addr) error {
	k, err := h.keeper()
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	old := k.vnis[vni]
	if old == nil {
		return fmt.Errorf("the member hosts of encrypted VNI %d are not known yet (SetPeers first)", vni)
	}
	hosts := slices.Clone(old)
	for _, a := range add {
		if !slices.Contains(hosts, a) {
			hosts = append(hosts, a)
		}
	}
	hosts = slices.DeleteFunc(hosts, func(a netip.Addr) bool { return slices.Contains(remove, a) })
	slices.SortFunc(hosts, func(a, b netip.Addr) int { return a.Compare(b) })
	if slices.Equal(hosts, old) {
		return nil
	}
	k.vnis[vni] = hosts
	return k.call(func(c *crypt.Client) error { return c.SetMembers(vni, hosts) })
}

// cryptRemove stops the data path carrying vni and, if no encrypted
// network is left on this host, stops it and removes the crypt namespace.
// Called with h.mu held.
func (h *Host) cryptRemove(vni uint32) error {
	k, err := h.keeper()
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	delete(k.vnis, vni)
	// Tell a running data path; none running is fine (nothing to tell).
	for try := 0; try < 2; try++ {
		if k.client == nil && k.dial() != nil {
			break
		}
		_, err := k.client.RemoveVNI(vni)
		if err == nil {
			break
		}
		k.client.Close()
		k.client = nil
		if try == 1 {
			return err
		}
	}
	if left, err := h.anyEncrypted(); err != nil || left {
		return err
	}
	if k.client != nil {
		if err := k.client.Stop(); err != nil {
			slog.Warn("encryption data path: stop", "err", err)
		}
		k.client.Close()
		k.client = nil
	}
	if k.enc.Runner != nil {
		k.ran, k.tidy = false, true
		k.poke()
	}
	os.Remove(k.enc.stateFile())
	// The data path also stops by itself once the namespace is gone.
	return removeNamedNS(h.cryptPath())
}

// anyEncrypted reports whether an encrypted network exists on this host.
// Called with h.mu held.
func (h *Host) anyEncrypted() (bool, error) {
	ids, err := namedNSes(h.dir(), h.prefix())
	if err != nil {
		return false, err
	}
	for _, id := range ids {
		if id == cryptID {
			continue
		}
		s, err := h.open(id)
		if errors.Is(err, ErrNotFound) {
			continue
		}
		if err != nil {
			return false, err
		}
		info, err := readInfo(s.ov)
		s.close()
		if err == nil && info.encrypted {
			return true, nil
		}
	}
	return false, nil
}

// call runs f with a connected client, starting the data path if none
// runs; a data path that was (re)started is first told everything. With a
// Runner, a data path that does not answer yet is not an error: what f
// tells it is recorded already, and it is told everything once it runs.
func (k *keeper) call(f func(c *crypt.Client) error) error {
	if k.client != nil {
		if err := f(k.client); err == nil {
			return nil
		}
		k.client.Close()
		k.client = nil
	}
	err := k.start()
	if err == nil {
		if err = f(k.client); err != nil && k.enc.Runner != nil {
			k.client.Close()
			k.client = nil
		}
	}
	if err != nil && k.enc.Runner != nil {
		slog.Debug("encryption data path not answering yet; it is told once it runs", "err", err)
		k.poke()
		return nil
	}
	return err
}

func (k *keeper) dial() error {
	c, err := crypt.Dial(k.enc.control())
	if err != nil {
		return err
	}
	k.client = c
	return nil
}

// start connects to the data path, starting it if needed, and tells it
// everything the keeper knows.
func (k *keeper) start() error {
	if !k.local.IsValid() {
		return errors.New("encryption data path: no local address yet")
	}
	if k.enc.Runner != nil {
		// The Runner starts it, and checks its settings.
		if err := k.dial(); err != nil {
			return err
		}
		if err := k.replay(); err != nil {
			k.client.Close()
			k.client = nil
			return err
		}
		return nil
	}
	takeover := false
	if err := k.dial(); err == nil && !k.checked {
		// A data path of an earlier run: keep it unless it works with
		// other settings or another key than this run's. A new one takes
		// over from it (make-before-break).
		if why := k.stale(); why != "" {
			slog.Info("encryption data path runs with other settings; replacing it", "reason", why)
			k.client.Close()
			k.client = nil
			takeover = true
		}
	}
	if k.client == nil {
		if err := k.spawn(takeover); err != nil {
			return err
		}
	}
	if err := k.replay(); err != nil {
		k.client.Close()
		k.client = nil
		return err
	}
	k.checked = true
	return nil
}

// stale says how the connected data path differs from what this keeper
// would start ("" if it does not).
func (k *keeper) stale() string {
	st, err := k.client.Status()
	if err != nil {
		return err.Error()
	}
	enc := k.enc
	priv, err := crypt.LoadOrCreateKey(enc.KeyFile)
	if err != nil {
		return err.Error()
	}
	psk, err := crypt.LoadPSK(enc.PSKFile)
	if err != nil {
		return err.Error()
	}
	switch {
	case st.Local != k.local:
		return fmt.Sprintf("local address %s, want %s", st.Local, k.local)
	case st.Port != enc.Port:
		return fmt.Sprintf("port %d, want %d", st.Port, enc.Port)
	case st.Interval != enc.RekeyInterval.String():
		return fmt.Sprintf("rekey interval %s, want %s", st.Interval, enc.RekeyInterval)
	case st.PublicKey != crypt.EncodePublic(priv.PublicKey()):
		return "another host key"
	case st.PSKID != crypt.PSKID(psk):
		return "another pre-shared secret"
	}
	return ""
}

// replay tells a data path what the keeper knows: nothing is removed, so a
// data path that knows more (after a plugin restart) loses nothing.
func (k *keeper) replay() error {
	if len(k.keys) > 0 {
		if err := k.client.SetKeys(k.keys); err != nil {
			return err
		}
	}
	for vni, hosts := range k.vnis {
		if err := k.client.AddVNI(vni); err != nil {
			return err
		}
		if hosts != nil {
			if err := k.client.SetMembers(vni, hosts); err != nil {
				return err
			}
		}
	}
	return nil
}

// config is the data path's configuration.
func (k *keeper) config() crypt.Config {
	enc := k.enc
	return crypt.Config{
		HostNetNS: k.h.NetNS, CryptNetNS: k.h.cryptPath(), Local: k.local, Port: enc.Port,
		KeyFile: enc.KeyFile, PSKFile: enc.PSKFile, RekeyInterval: enc.RekeyInterval,
		Control: enc.control(), StateFile: enc.stateFile(), LogLevel: enc.LogLevel,
	}
}

// spawn starts the data path process and waits until it answers; with
// takeover, it takes over from the one that runs.
func (k *keeper) spawn(takeover bool) error {
	enc := k.enc
	if len(enc.Command) == 0 {
		return errors.New("encryption data path: no command to start it")
	}
	if err := os.MkdirAll(enc.StateDir, 0o700); err != nil {
		return fmt.Errorf("encryption data path: %w", err)
	}
	cfg := k.config()
	cfg.Takeover = takeover
	cfg.Tag = fmt.Sprintf("spawned-%d-%d", os.Getpid(), time.Now().UnixNano())
	b, err := json.Marshal(cfg)
	if err != nil {
		return err
	}
	cmd := exec.Command(enc.Command[0], enc.Command[1:]...)
	cmd.Env = append(os.Environ(), crypt.ConfigEnv+"="+string(b))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if enc.LogFile != "" {
		f, err := os.OpenFile(enc.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			return fmt.Errorf("encryption data path log: %w", err)
		}
		defer f.Close() // the child has its own copy
		cmd.Stdout, cmd.Stderr = f, f
	}
	// Its own session: a plugin that dies (kill -9) leaves it running.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("encryption data path: start %s: %w", enc.Command[0], err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	// The new one answers (with its tag: while it takes over, the one it
	// replaces still answers too).
	ours := func() bool {
		if k.dial() != nil {
			return false
		}
		if st, err := k.client.Status(); err == nil && (st.Tag == cfg.Tag || !takeover) {
			return true
		}
		k.client.Close()
		k.client = nil
		return false
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if ours() {
			slog.Info("encryption data path started", "pid", cmd.Process.Pid, "took_over", takeover)
			return nil
		}
		select {
		case err := <-exited:
			if !takeover && k.dial() == nil { // another one was faster
				return nil
			}
			return fmt.Errorf("encryption data path exited at start (%v); see its log", err)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return errors.New("encryption data path does not answer after 10s")
		}
	}
}

// watch restarts a data path that died while encrypted networks exist.
func (k *keeper) watch() {
	for range time.Tick(time.Second) {
		k.mu.Lock()
		if len(k.vnis) > 0 {
			if isNamedNS(k.h.cryptPath()) {
				err := k.call(func(c *crypt.Client) error { _, err := c.Status(); return err })
				if err != nil {
					slog.Warn("encryption data path not answering; retrying", "err", err)
				}
			}
		}
		k.mu.Unlock()
	}
}

// poke wakes the run loop (with a Runner).
func (k *keeper) poke() {
	if k.wake == nil {
		return
	}
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// runLoop has the Runner run the data path while the crypt namespace
// exists (and checks every second that it answers), and tidy up after the
// last encrypted network. The Runner is called without k.mu held.
func (k *keeper) runLoop() {
	ctx := context.Background()
	var backoff time.Duration
	var retry time.Time
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-k.wake:
		case <-tick.C:
		}
		k.mu.Lock()
		want := k.local.IsValid() && isNamedNS(k.h.cryptPath())
		answers := false
		if want && k.ran {
			if k.client == nil {
				k.start()
			}
			if k.client != nil {
				if _, err := k.client.Status(); err == nil {
					answers = true
				} else {
					k.client.Close()
					k.client = nil
				}
			}
		}
		tidy := k.tidy && !want
		cfg := k.config()
		k.mu.Unlock()

		switch {
		case want && !answers:
			if time.Now().Before(retry) {
				continue
			}
			if err := k.enc.Runner.Run(ctx, cfg); err != nil {
				backoff = min(max(2*backoff, time.Second), 30*time.Second)
				retry = time.Now().Add(backoff)
				slog.Warn("encryption data path not running; retrying", "in", backoff, "err", err)
				continue
			}
			backoff, retry = 0, time.Time{}
			k.mu.Lock()
			k.ran = true
			// Tell the data path that runs now everything (it may be a
			// new one, which took over).
			if k.client != nil {
				k.client.Close()
				k.client = nil
			}
			if err := k.start(); err != nil {
				slog.Warn("encryption data path: telling it what it carries", "err", err)
			}
			k.mu.Unlock()
		case tidy:
			if err := k.enc.Runner.Tidy(ctx); err != nil {
				slog.Warn("encryption data path: tidying up", "err", err)
				continue
			}
			k.mu.Lock()
			k.tidy = false
			k.mu.Unlock()
		}
	}
}
