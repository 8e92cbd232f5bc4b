package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/internal/metrics"
	"github.com/dnplabs/docker-net-plugin/internal/pluginapi"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/names"
	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/overlay/crypt/dockerrun"
	"github.com/dnplabs/docker-net-plugin/store"
)

type serveFlags struct {
	store               store.Config
	host                hostFlags
	name, socket        string
	scope               string
	liveTTL             time.Duration
	staleAfter          time.Duration
	logLevel, logFormat string
	logOutput           string
	defaultPool         string
	defaultPoolSize     int
	metricsAddr         string
	namesAddr           string
	namesCache          string
	dockerHost          string
	keepLive            bool
	cryptContainer      bool
}

func serve(ctx context.Context, args []string) error {
	var f serveFlags
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	addStoreFlags(fs, &f.store)
	addHostFlags(fs, &f.host)
	fs.StringVar(&f.name, "name", "dnp", "plugin name: the -d and --ipam-driver value of a legacy plugin")
	fs.StringVar(&f.socket, "socket", "", "unix socket path (default /run/docker/plugins/<name>.sock)")
	fs.StringVar(&f.scope, "scope", "local", "driver scope: local (plain hosts) or global (swarm)")
	fs.DurationVar(&f.liveTTL, "live-ttl", 15*time.Second, "how long after this host dies the others forget it")
	fs.DurationVar(&f.staleAfter, "stale-after", driver.DefaultStaleAfter, "how long a host may be gone before its networks, overlays, orphaned endpoints and addresses are purged; use one value on every host")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "text or json")
	fs.StringVar(&f.logOutput, "log-output", "stderr", "stderr or stdout (a managed plugin's stdout is logged by dockerd at level info, its stderr at level error)")
	fs.StringVar(&f.defaultPool, "default-pool", "10.210.0.0/16", "range that pools without --subnet are carved from")
	fs.IntVar(&f.defaultPoolSize, "default-pool-size", 24, "prefix length of the subnets carved from --default-pool")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on this TCP address at /metrics (e.g. 127.0.0.1:9477); empty: off")
	fs.StringVar(&f.namesAddr, "names-addr", names.DefaultAddr.String(), "link-local address of the name server that resolves containers across hosts (docs/names.md); off: no names across hosts")
	fs.StringVar(&f.namesCache, "names-cache", "/var/lib/docker-net-plugin/names.json", "file where the name server keeps what it knows, to answer from after a restart while the store is down; empty: none")
	fs.StringVar(&f.dockerHost, "docker-host", "unix:///var/run/docker.sock", "this host's dockerd API socket, where the names of its containers are read")
	fs.BoolVar(&f.cryptContainer, "crypt-container", false, "run the encryption data path of encrypted overlays as a container of its own, through --docker-host, so that it outlives the plugin (the managed plugin sets it: its own processes all end with it); see docs/encryption.md")
	fs.BoolVar(&f.keepLive, "keep-live-on-stop", false, "on SIGTERM with containers still on this host's overlays, leave this host's live key to lapse after --live-ttl instead of deleting it: a plugin back within the TTL (docker plugin disable, set, upgrade, enable) loses no traffic (the managed plugin sets it)")
	if err := envFlags(fs); err != nil {
		return err
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	out := os.Stderr
	switch f.logOutput {
	case "stderr":
	case "stdout":
		out = os.Stdout
	default:
		return fmt.Errorf("--log-output %q: want stderr or stdout", f.logOutput)
	}
	log, err := newLogger(out, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	if f.staleAfter < 2*f.liveTTL {
		return fmt.Errorf("--stale-after %s: want at least twice --live-ttl (%s)", f.staleAfter, f.liveTTL)
	}
	if f.scope != "local" && f.scope != "global" {
		return fmt.Errorf("--scope %q: want local or global", f.scope)
	}
	if f.socket == "" {
		f.socket = filepath.Join("/run/docker/plugins", f.name+".sock")
	}
	addr, err := advertiseAddr(f.host.advertise)
	if err != nil {
		return err
	}
	machine, err := machineID(f.host.encryption.stateDir)
	if err != nil {
		return err
	}
	pool, err := netip.ParsePrefix(f.defaultPool)
	if err != nil || f.defaultPoolSize < pool.Bits() || f.defaultPoolSize > pool.Addr().BitLen() {
		return fmt.Errorf("--default-pool %q with --default-pool-size %d: want a CIDR range and a prefix length inside it", f.defaultPool, f.defaultPoolSize)
	}

	plane := driver.NewKernelPlane(addr, f.host.netnsDir, f.host.netnsPrefix)
	enc, pub, err := f.host.encryption.encryption(f.logLevel)
	if err != nil {
		// Plain overlays work without it; -o encrypted then says why not.
		log.Warn("encrypted overlays unavailable", "err", err)
	} else {
		if f.cryptContainer {
			r, err := dockerrun.New(f.dockerHost, f.host.netnsPrefix+"crypt", log)
			if err != nil {
				log.Warn("the encryption data path runs inside the plugin and ends with it", "err", err)
			} else {
				enc.Runner = r
			}
		}
		plane = driver.NewEncryptingKernelPlane(addr, f.host.netnsDir, f.host.netnsPrefix, enc)
	}
	if ep, ok := plane.(driver.EncryptingPlane); ok {
		// First thing: encrypted overlays' traffic must not wait for the
		// store if the data path died with a previous run.
		if err := ep.ResumeEncryption(); err != nil {
			log.Warn("resuming the encryption data path failed; retried once the store is read", "err", err)
		}
	}

	var m *metrics.Metrics
	if f.metricsAddr != "" {
		m = metrics.New()
		if _, err := m.Serve(ctx, f.metricsAddr, log); err != nil {
			return err
		}
	}
	raw, err := openStore(ctx, f.store)
	if err != nil {
		return err
	}
	var nd *driver.Driver
	defer func() {
		if nd != nil && nd.KeptLive() {
			return // closing the store would delete the live key
		}
		raw.Close()
	}()
	if err := checkAccess(ctx, raw, log); err != nil {
		return err
	}
	st := m.Store(raw) // records latency and errors when metrics are on

	if f.host.netnsDir != legacyNetnsDir {
		dropLegacyNetns(legacyNetnsDir, f.host.netnsPrefix, log)
	}
	ns, err := nameService(ctx, f, st, addr, log)
	if err != nil {
		return err
	}
	cfg := driver.Config{Store: st, Plane: plane, HostAddr: addr, MachineID: machine, Scope: f.scope, LiveTTL: f.liveTTL, StaleAfter: f.staleAfter,
		Log: log, PublicKey: pub, HostLock: (&overlay.Host{Dir: f.host.netnsDir, Prefix: f.host.netnsPrefix}).LockShared,
		// The embedded store has no other host to keep informed.
		KeepLiveOnStop: f.keepLive && !strings.HasPrefix(f.store.URL, "bolt:")}
	if ns != nil {
		cfg.Names = ns
	}
	var observe pluginapi.Observer
	if m != nil {
		cfg.Metrics = m
		observe = m.PluginCall
	}
	nd = driver.New(cfg)
	id := ipam.New(st, ipam.Options{
		HostID:       addr.String(),
		DefaultPools: []ipam.DefaultPool{{Base: pool, Size: f.defaultPoolSize}},
		// libnetwork then marks container address requests with their MAC,
		// which tells them from --aux-address reservations (shared by hosts).
		RequireMACAddress: true,
		Logger:            log,
	})
	l, err := pluginapi.Listen(f.socket)
	if err != nil {
		return err
	}
	nd.Start(ctx)
	if ns != nil {
		ns.Start(ctx)
	}
	log.Info("plugin serving", "socket", f.socket, "store", st.Endpoint(), "advertise", addr, "machine_id", machine, "scope", f.scope, "version", version)
	rt := pluginapi.New(nd, id, log, observe)
	rt.Refuse(nd.Refused) // another machine holds this host's advertise address
	err = pluginapi.Serve(ctx, l, rt, log)
	if ctx.Err() != nil {
		// Let the driver release this host's live key before the store closes.
		select {
		case <-nd.Done():
		case <-time.After(10 * time.Second):
			log.Warn("driver did not stop within 10s")
		}
		if ns != nil {
			select {
			case <-ns.Done():
			case <-time.After(5 * time.Second):
				log.Warn("name service did not stop within 5s")
			}
		}
		if enc != nil {
			// The last encrypted overlay may have gone just now: what ran
			// its data path goes too (docker plugin rm may follow).
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if err := (&overlay.Host{Dir: f.host.netnsDir, Prefix: f.host.netnsPrefix, Encryption: enc}).SettleEncryption(sctx); err != nil {
				log.Warn("encryption data path: tidying up", "err", err)
			}
			cancel()
		}
	}
	log.Info("plugin stopped")
	return err
}

// nameService is the service that resolves container names across hosts,
// or nil when it is off: by --names-addr off, and in swarm (global scope),
// where Docker resolves names itself and the plugin only answers REFUSED
// on the address in the host's namespace.
func nameService(ctx context.Context, f serveFlags, st store.Store, host netip.Addr, log *slog.Logger) (*names.Service, error) {
	if f.namesAddr == "off" {
		return nil, nil
	}
	a, err := netip.ParseAddr(f.namesAddr)
	if err != nil {
		return nil, fmt.Errorf("--names-addr %q: %v (or off)", f.namesAddr, err)
	}
	if f.scope == "global" {
		if err := names.RefuseOnHost(ctx, a); err != nil {
			log.Warn("cannot answer on the name server's address in the host's namespace", "err", err)
		}
		return nil, nil
	}
	netnsHost := &overlay.Host{Dir: f.host.netnsDir, Prefix: f.host.netnsPrefix}
	ns, err := names.New(names.Config{
		Store: st, Host: host.String(), Addr: a, Docker: f.dockerHost, Cache: f.namesCache, Log: log,
		NetNS: func(vni uint32) (string, error) {
			n, err := netnsHost.Network(strconv.FormatUint(uint64(vni), 10))
			if err != nil {
				return "", err
			}
			return n.NetNS, nil
		},
	})
	if err != nil {
		return nil, fmt.Errorf("--names-addr: %w", err)
	}
	return ns, nil
}

// advertiseAddr is the given address, else the IPv4 address of the
// interface holding the default route, else the only non-loopback one.
func advertiseAddr(given string) (netip.Addr, error) {
	if given != "" {
		a, err := netip.ParseAddr(given)
		if err != nil {
			return a, fmt.Errorf("--advertise-addr %q: %v", given, err)
		}
		return a, nil
	}
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return netip.Addr{}, fmt.Errorf("list routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst != nil && r.Dst.String() != "0.0.0.0/0" {
			continue
		}
		link, err := netlink.LinkByIndex(r.LinkIndex)
		if err != nil {
			continue
		}
		if a, ok := firstIPv4(link); ok {
			return a, nil
		}
	}
	var found []netip.Addr
	links, _ := netlink.LinkList()
	for _, link := range links {
		if link.Attrs().Flags&net.FlagLoopback != 0 {
			continue
		}
		if a, ok := firstIPv4(link); ok {
			found = append(found, a)
		}
	}
	if len(found) == 1 {
		return found[0], nil
	}
	return netip.Addr{}, errors.New("cannot tell this host's underlay address (no default route and not exactly one interface address): set --advertise-addr")
}

func firstIPv4(link netlink.Link) (netip.Addr, bool) {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return netip.Addr{}, false
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && a.IP.IsGlobalUnicast() {
			return ip, true
		}
	}
	return netip.Addr{}, false
}

// checkAccess fails at start when the store refuses the credentials. A store
// that cannot be reached yet is fine: the plugin serves what it can and
// converges once the store answers (the boot-order problem).
func checkAccess(ctx context.Context, st store.Store, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := st.List(ctx, driver.HostsDir)
	switch {
	case errors.Is(err, store.ErrDenied):
		return fmt.Errorf("the store refuses this plugin: %w", err)
	case err != nil:
		log.Warn("store not reachable yet; serving anyway and retrying in the background", "err", err)
	}
	return nil
}

// legacyNetnsDir is where the managed plugin kept its overlay namespaces
// before they moved to the state mount: its propagated mount, which
// dockerd unmounts on every disable, upgrade and rm.
const legacyNetnsDir = "/run/dnp/netns"

// dropLegacyNetns removes the files an older release left in dir (after
// the upgrade nothing is mounted on them any more) and says what that
// means for containers started before the upgrade.
func dropLegacyNetns(dir, prefix string, log *slog.Logger) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return // none: a fresh install or a legacy plugin
	}
	var dropped []string
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		path := filepath.Join(dir, e.Name())
		var st unix.Statfs_t
		if unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC {
			continue // a namespace is still bound there: not ours to drop
		}
		if err := os.Remove(path); err != nil {
			log.Warn("cannot remove an overlay namespace file of an older release", "path", path, "err", err)
			continue
		}
		dropped = append(dropped, e.Name())
	}
	if len(dropped) > 0 {
		log.Warn("upgraded from a release that kept overlay namespaces in the propagated mount: they were lost "+
			"when the plugin was disabled, so containers started before the upgrade have no overlay interface; "+
			"restart them (docker restart)", "old_dir", dir, "namespaces", dropped)
	}
}
