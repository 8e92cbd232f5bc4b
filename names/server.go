package names

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"syscall"

	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/overlay"
)

// server is one name server: UDP and TCP on the name server's address,
// port 53, in one network namespace.
type server struct {
	ov     driver.Overlay // the overlay it serves (none for the host's)
	nsPath string         // where the namespace it listens in is bound
	nsIno  uint64         // inode of that namespace
	pc     net.PacketConn
	l      net.Listener
}

// close stops the server: its serving loops end on the closed sockets.
func (sv *server) close() {
	sv.pc.Close()
	sv.l.Close()
}

// listen starts a name server on addr:53 in the namespace at nsPath ("":
// the host's own), with handler h.
func listen(nsPath string, addr netip.Addr, h dns.Handler) (*server, error) {
	var (
		pc  net.PacketConn
		l   net.Listener
		err error
	)
	open := func() error {
		hostPort := net.JoinHostPort(addr.String(), "53")
		if pc, err = net.ListenPacket("udp4", hostPort); err != nil {
			return fmt.Errorf("listen udp %s: %w", hostPort, err)
		}
		if l, err = net.Listen("tcp4", hostPort); err != nil {
			pc.Close()
			return fmt.Errorf("listen tcp %s: %w", hostPort, err)
		}
		return nil
	}
	if nsPath == "" {
		err = open()
	} else {
		err = inNetNS(nsPath, open)
	}
	if err != nil {
		return nil, err
	}
	go (&dns.Server{PacketConn: pc, Handler: h}).ActivateAndServe()
	go (&dns.Server{Listener: l, Handler: h}).ActivateAndServe()
	return &server{pc: pc, l: l}, nil
}

// inNetNS runs fn on a thread of its own in the namespace at path. The
// thread is never handed back to the Go scheduler: it ends with the
// goroutine, so nothing else ever runs in the wrong namespace. Sockets fn
// opens stay in that namespace.
func inNetNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // deliberately never unlocked
		ns, err := netns.GetFromPath(path)
		if err != nil {
			errc <- fmt.Errorf("open namespace %s: %w", path, err)
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", path, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// nsInode identifies the namespace bound at path.
func nsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}

// ensureAddr puts addr/32 on the device (once), scope link.
func ensureAddr(h *netlink.Handle, dev string, addr netip.Addr) error {
	link, err := h.LinkByName(dev)
	if err != nil {
		return fmt.Errorf("find %s: %w", dev, err)
	}
	want := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: unix.RT_SCOPE_LINK}
	if err := h.AddrAdd(link, want); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add %s to %s: %w", addr, dev, err)
	}
	return nil
}

// prepareOverlay makes the overlay's namespace ready for its name server:
// the address on the bridge (the bridge answers ARP for it and never
// forwards that ARP to other hosts, as for the gateway), and a route back
// to every subnet that has no gateway address on the bridge.
func prepareOverlay(nsPath string, addr netip.Addr, ov driver.Overlay) error {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in %s: %w", nsPath, err)
	}
	defer h.Close()
	if err := ensureAddr(h, overlay.BridgeDevice, addr); err != nil {
		return err
	}
	br, err := h.LinkByName(overlay.BridgeDevice)
	if err != nil {
		return fmt.Errorf("find %s: %w", overlay.BridgeDevice, err)
	}
	for i, sub := range ov.Subnets {
		if !sub.Addr().Is4() || (i < len(ov.Gateways) && ov.Gateways[i].IsValid()) {
			continue
		}
		dst := &net.IPNet{IP: sub.Masked().Addr().AsSlice(), Mask: net.CIDRMask(sub.Bits(), 32)}
		r := &netlink.Route{LinkIndex: br.Attrs().Index, Dst: dst, Scope: netlink.SCOPE_LINK}
		if err := h.RouteReplace(r); err != nil {
			return fmt.Errorf("route %s on %s: %w", sub, overlay.BridgeDevice, err)
		}
	}
	return nil
}

// startHostServer answers REFUSED on the name server's address in the
// host's own namespace (see hostResponder).
func (s *Service) startHostServer() {
	sv, err := hostResponder(s.cfg.Addr)
	if err != nil {
		s.log.Warn("cannot answer on the name server's address in the host's namespace; containers on no overlay may wait for it to time out", "err", err)
		return
	}
	s.srvMu.Lock()
	s.servers[0] = sv // VNI 0 is never an overlay's
	s.srvMu.Unlock()
}

// hostResponder puts addr on the host's loopback device and answers
// REFUSED there: containers on no overlay of this plugin (the daemon's
// "dns" setting is theirs too) reach the address through their default
// route and go on to their next server at once, instead of waiting for a
// timeout.
func hostResponder(addr netip.Addr) (*server, error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return nil, err
	}
	err = ensureAddr(h, "lo", addr)
	h.Close()
	if err != nil {
		return nil, err
	}
	return listen("", addr, dns.HandlerFunc(refused))
}

// RefuseOnHost answers REFUSED on addr in the host's namespace until ctx
// ends. It is all a swarm node's plugin does for names (Docker resolves
// names of swarm networks itself), in case the daemon's "dns" setting
// names addr there too.
func RefuseOnHost(ctx context.Context, addr netip.Addr) error {
	if !addr.Is4() || !addr.IsLinkLocalUnicast() {
		return fmt.Errorf("name server address %v: want an IPv4 link-local address (169.254.0.0/16)", addr)
	}
	sv, err := hostResponder(addr)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		sv.close()
	}()
	return nil
}

// serveOverlay makes the overlay's name server run (again, if its
// namespace was replaced). Problems are logged: they cost names, not
// connectivity.
func (s *Service) serveOverlay(ov driver.Overlay) {
	if err := s.ensureOverlayServer(ov); err != nil {
		s.log.Error("no name server on overlay; names of other hosts do not resolve on it", "overlay", ov.Name, "vni", ov.VNI, "err", err)
	}
}

func (s *Service) ensureOverlayServer(ov driver.Overlay) error {
	// Fast path, on every Join and reconciliation: the server runs in the
	// namespace still bound at its path.
	s.srvMu.Lock()
	if sv := s.servers[ov.VNI]; sv != nil && sv.ov.Name == ov.Name {
		if ino, err := nsInode(sv.nsPath); err == nil && ino == sv.nsIno {
			sv.ov = ov
			s.srvMu.Unlock()
			return nil
		}
	}
	s.srvMu.Unlock()

	path, err := s.cfg.NetNS(ov.VNI)
	if err != nil {
		return err
	}
	ino, err := nsInode(path)
	if err != nil {
		return err
	}
	if err := prepareOverlay(path, s.cfg.Addr, ov); err != nil {
		return err
	}
	s.srvMu.Lock()
	defer s.srvMu.Unlock()
	if sv := s.servers[ov.VNI]; sv != nil {
		if sv.nsIno == ino && sv.ov.Name == ov.Name {
			sv.ov = ov
			return nil
		}
		sv.close()
		delete(s.servers, ov.VNI)
	}
	sv, err := listen(path, s.cfg.Addr, s.serveOverlayDNS(ov.Name))
	if err != nil {
		return err
	}
	sv.ov, sv.nsPath, sv.nsIno = ov, path, ino
	s.servers[ov.VNI] = sv
	s.log.Info("name server running", "overlay", ov.Name, "vni", ov.VNI, "addr", s.cfg.Addr)
	return nil
}

// stopOverlay stops the overlay's name server (its sockets would keep the
// namespace alive).
func (s *Service) stopOverlay(vni uint32) {
	s.srvMu.Lock()
	defer s.srvMu.Unlock()
	if sv := s.servers[vni]; sv != nil && vni != 0 {
		sv.close()
		delete(s.servers, vni)
		s.log.Info("name server stopped", "overlay", sv.ov.Name, "vni", strconv.FormatUint(uint64(vni), 10))
	}
}

func (s *Service) stopServers() {
	s.srvMu.Lock()
	defer s.srvMu.Unlock()
	for vni, sv := range s.servers {
		sv.close()
		delete(s.servers, vni)
	}
}

// OverlayUp makes the overlay's name server run while the overlay exists
// on this host (driver.NameService).
func (s *Service) OverlayUp(ov driver.Overlay) { s.serveOverlay(ov) }

// OverlayDown stops the overlay's name server before the overlay goes.
func (s *Service) OverlayDown(vni uint32) { s.stopOverlay(vni) }
