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
	"time"

	"github.com/vishvananda/netlink"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/internal/pluginapi"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/overlay"

	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

type serveFlags struct {
	store                   store.Config
	name, socket, advertise string
	scope                   string
	liveTTL                 time.Duration
	logLevel, logFormat     string
	defaultPool             string
	defaultPoolSize         int
	netnsPrefix, netnsDir   string
}

func serve(ctx context.Context, args []string) error {
	var f serveFlags
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.StringVar(&f.store.URL, "store", store.DefaultURL, "store URL: bolt:///path, etcd://h:2379[,h2:2379]/prefix, consul://h:8500/prefix, zk://h:2181/prefix")
	fs.StringVar(&f.store.CAFile, "store-ca", "", "CA certificate file for the store (etcd, Consul)")
	fs.StringVar(&f.store.CertFile, "store-cert", "", "client certificate file for the store (etcd, Consul)")
	fs.StringVar(&f.store.KeyFile, "store-key", "", "client key file for the store (etcd, Consul)")
	fs.StringVar(&f.store.Token, "store-token", "", "Consul ACL token")
	fs.StringVar(&f.store.Username, "store-username", "", "user for etcd auth or ZooKeeper digest auth")
	fs.StringVar(&f.store.Password, "store-password", "", "password for etcd auth or ZooKeeper digest auth")
	fs.StringVar(&f.name, "name", "dnp", "plugin name: the -d and --ipam-driver value of a legacy plugin")
	fs.StringVar(&f.socket, "socket", "", "unix socket path (default /run/docker/plugins/<name>.sock)")
	fs.StringVar(&f.advertise, "advertise-addr", "", "this host's underlay address (default: the address of the interface with the default route)")
	fs.StringVar(&f.scope, "scope", "local", "driver scope: local (plain hosts) or global (swarm)")
	fs.DurationVar(&f.liveTTL, "live-ttl", 15*time.Second, "how long after this host dies the others forget it")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "text or json")
	fs.StringVar(&f.netnsPrefix, "netns-prefix", "dnp-", "names of the per-overlay network namespaces (/run/netns/<prefix><vni>); set it per host when several hosts share one machine")
	fs.StringVar(&f.netnsDir, "netns-dir", overlay.DefaultDir, "directory the per-overlay network namespaces are bound in")
	fs.StringVar(&f.defaultPool, "default-pool", "10.210.0.0/16", "range that pools without --subnet are carved from")
	fs.IntVar(&f.defaultPoolSize, "default-pool-size", 24, "prefix length of the subnets carved from --default-pool")
	if err := envFlags(fs); err != nil {
		return err
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	f.store = f.store.FromEnv()
	log, err := newLogger(os.Stderr, f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	if f.scope != "local" && f.scope != "global" {
		return fmt.Errorf("--scope %q: want local or global", f.scope)
	}
	if f.socket == "" {
		f.socket = filepath.Join("/run/docker/plugins", f.name+".sock")
	}
	addr, err := advertiseAddr(f.advertise)
	if err != nil {
		return err
	}
	pool, err := netip.ParsePrefix(f.defaultPool)
	if err != nil || f.defaultPoolSize < pool.Bits() || f.defaultPoolSize > pool.Addr().BitLen() {
		return fmt.Errorf("--default-pool %q with --default-pool-size %d: want a CIDR range and a prefix length inside it", f.defaultPool, f.defaultPoolSize)
	}

	openCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	st, err := stores.Open(openCtx, f.store)
	cancel()
	if err != nil {
		return fmt.Errorf("open store: %w", err)
	}
	defer st.Close()

	plane := driver.NewKernelPlane(addr, f.netnsDir, f.netnsPrefix)
	nd := driver.New(driver.Config{Store: st, Plane: plane, HostAddr: addr, Scope: f.scope, LiveTTL: f.liveTTL, Log: log})
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
	log.Info("plugin serving", "socket", f.socket, "store", st.Endpoint(), "advertise", addr, "scope", f.scope, "version", version)
	err = pluginapi.Serve(ctx, l, pluginapi.New(nd, id, log, nil), log)
	log.Info("plugin stopped")
	return err
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
