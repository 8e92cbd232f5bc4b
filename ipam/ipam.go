// Package ipam is the plugin's IpamDriver: address pools and addresses
// shared by every host of the cluster through the store.
//
// A pool is named by address space, subnet and optional ip-range, so every
// host asking for the same subnet gets the same pool id and the same
// gateway. Pools and shared reservations (gateway, auxiliary addresses) are
// reference-counted per host; container addresses are exclusive.
//
// The records in the store: address spaces, allocated addresses and
// allocation hints below ipam/ (schema.go).
//
// A dynamic allocation is one transaction (create the address key, move
// the hint); it never reads or writes the whole pool. Hosts that collide
// spread out (each jumps a random distance ahead); only after many
// collisions in a row does a host list the pool's allocations once, to find
// free addresses or report the pool exhausted.
//
// Addresses still allocated when the last host releases a pool have leaked:
// they stay reserved (and listed by Allocations) until their holder
// releases them; a leftover gateway is taken up by the next pool.
//
// Swarm. The global address space (GlobalSpace) is the swarm manager's: the
// leading manager allocates each swarm network's pool and gateway and every
// VIP and task address there, and each node then claims its tasks'
// addresses, explicitly and with a MAC, in the local space. References in
// the global space belong to the swarm ("swarm"), not to a host, so a new
// leader can release what an old one requested. Swarm keeps its
// allocations in its own state and, when a manager restarts or another one
// takes over, requests them all again: pool, explicit gateway, then every
// VIP and task address. The first two show that (an explicit request for
// the gateway a global subnet already has): the driver then drops the
// pool reference just added, and starts a new epoch for the subnet, in
// which explicit requests for addresses of earlier epochs take them over
// instead of failing as "in use". Within one epoch every address is
// exclusive, as in the local space.
package ipam

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"

	"github.com/dnplabs/docker-net-plugin/store"
)

// The address spaces this driver reports to Docker.
const (
	LocalSpace  = "dnp-local"
	GlobalSpace = "dnp-global"
)

// Option keys.
const (
	// OptSubnetSize (--ipam-opt subnet-size=26) is the prefix length of the
	// subnet carved from the default range when no --subnet is given.
	OptSubnetSize = "subnet-size"

	// RequestAddressType and the gateway value are what libnetwork puts in
	// RequestAddress options when it asks for a network's gateway.
	optRequestAddressType = "RequestAddressType"
	gatewayType           = "com.docker.network.gateway"
	// optMACAddress is set on endpoint address requests when the driver
	// reports RequiresMACAddress.
	optMACAddress = "com.docker.network.endpoint.macaddress"
)

// Errors callers can test with errors.Is. Every error returned by the
// driver wraps one of these (or a store error) and names what failed.
var (
	ErrInvalid       = errors.New("invalid request")
	ErrUnknownPool   = errors.New("unknown pool")
	ErrOverlap       = errors.New("overlapping pool")
	ErrInUse         = errors.New("address in use")
	ErrExhausted     = errors.New("exhausted")
	ErrNotAllocated  = errors.New("address not allocated")
	ErrNotHeld       = errors.New("not held by this host")
	ErrBusy          = errors.New("too much contention, try again")
	ErrNoDefaultPool = errors.New("no default pool")
)

// DefaultPool is a range pools are carved from when RequestPool gives no
// subnet: subnets of prefix length Size inside Base.
type DefaultPool struct {
	Base netip.Prefix
	Size int
}

// DefaultPools is what Options.DefaultPools falls back to.
var DefaultPools = []DefaultPool{{Base: netip.MustParsePrefix("10.210.0.0/16"), Size: 24}}

// Options configure a Driver.
type Options struct {
	// HostID names this host in reference counts and allocation records.
	// Every host must use a different, stable one. Default: the hostname.
	HostID string
	// DefaultPools are carved into subnets for pools requested without a
	// subnet, first fit, in order. IPv6 pools need an IPv6 entry here.
	// Default: DefaultPools (10.210.0.0/16 in /24s).
	DefaultPools []DefaultPool
	// RequireMACAddress makes GetCapabilities ask libnetwork for a MAC
	// address. libnetwork then puts the endpoint's MAC into every endpoint
	// address request, which is the only way to tell `docker run --ip`
	// (exclusive) from --aux-address reservations (nil options; shared by
	// every host creating the network). When false, an auxiliary address is
	// an exclusive explicit address: a second host creating the same network
	// with the same --aux-address gets "address in use".
	RequireMACAddress bool
	// Timeout bounds each IPAM call. Default 20s.
	Timeout time.Duration
	// Logger; default slog.Default().
	Logger *slog.Logger
}

// Driver is the IpamDriver (the plugin API router calls its methods) on a store.Store.
type Driver struct {
	s       store.Store
	host    string
	pools   []DefaultPool
	mac     bool
	timeout time.Duration
	log     *slog.Logger

	mu      sync.Mutex
	cursors map[string]netip.Addr   // pool id -> next dynamic candidate
	spare   map[string][]netip.Addr // pool id -> free addresses the last listing found
	known   map[string]bool         // pools this host holds a ref on
}

// New returns a driver keeping its state in s.
func New(s store.Store, opts Options) *Driver {
	d := &Driver{
		s:       s,
		host:    opts.HostID,
		pools:   opts.DefaultPools,
		mac:     opts.RequireMACAddress,
		timeout: opts.Timeout,
		log:     opts.Logger,
		cursors: map[string]netip.Addr{},
		spare:   map[string][]netip.Addr{},
		known:   map[string]bool{},
	}
	if d.host == "" {
		d.host, _ = os.Hostname()
	}
	if d.pools == nil {
		d.pools = DefaultPools
	}
	if d.timeout <= 0 {
		d.timeout = 20 * time.Second
	}
	if d.log == nil {
		d.log = slog.Default()
	}
	d.log = d.log.With("component", "ipam", "host", d.host)
	return d
}

// HostID is the name this driver records as holder.
func (d *Driver) HostID() string { return d.host }

// swarmHolder holds the references of the global space (see the package
// documentation).
const swarmHolder = "swarm"

// holder is who holds this driver's references in space.
func (d *Driver) holder(space string) string {
	if space == GlobalSpace {
		return swarmHolder
	}
	return d.host
}

func (d *Driver) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d.timeout)
}

// GetCapabilities reports whether endpoint requests need a MAC address.
func (d *Driver) GetCapabilities(ctx context.Context) (*ipam.CapabilitiesResponse, error) {
	return &ipam.CapabilitiesResponse{RequiresMACAddress: d.mac}, nil
}

// GetDefaultAddressSpaces names the local and the global address space.
func (d *Driver) GetDefaultAddressSpaces(ctx context.Context) (*ipam.AddressSpacesResponse, error) {
	return &ipam.AddressSpacesResponse{
		LocalDefaultAddressSpace:  LocalSpace,
		GlobalDefaultAddressSpace: GlobalSpace,
	}, nil
}

// RequestPool returns the pool of the request's space, subnet and ip-range,
// creating it if no host has yet, and takes a reference on it for this host.
// With no subnet it carves a new one from the default pools.
func (d *Driver) RequestPool(ctx context.Context, req *ipam.RequestPoolRequest) (*ipam.RequestPoolResponse, error) {
	d.log.Debug("pool request", "space", req.AddressSpace, "pool", req.Pool, "subpool", req.SubPool, "v6", req.V6, "options", req.Options)
	ctx, cancel := d.opContext(ctx)
	defer cancel()
	p, err := d.requestPool(ctx, req)
	if err != nil {
		d.log.Warn("request pool failed", "space", req.AddressSpace, "pool", req.Pool, "subpool", req.SubPool, "v6", req.V6, "err", err)
		return nil, err
	}
	return &ipam.RequestPoolResponse{PoolID: p.ID, Pool: p.Subnet.String(), Data: map[string]string{}}, nil
}

// ReleasePool drops this host's reference on a pool; the pool goes when the
// last host released it.
func (d *Driver) ReleasePool(ctx context.Context, req *ipam.ReleasePoolRequest) error {
	ctx, cancel := d.opContext(ctx)
	defer cancel()
	if err := d.releasePool(ctx, req.PoolID); err != nil {
		d.log.Warn("release pool failed", "pool", req.PoolID, "err", err)
		return err
	}
	return nil
}

// RequestAddress allocates an address: the next free one of the pool's
// range, the exact one asked for, the pool's gateway (shared by all hosts)
// or an auxiliary reservation (see Options.RequireMACAddress).
func (d *Driver) RequestAddress(ctx context.Context, req *ipam.RequestAddressRequest) (*ipam.RequestAddressResponse, error) {
	d.log.Debug("address request", "pool", req.PoolID, "address", req.Address, "options", req.Options)
	ctx, cancel := d.opContext(ctx)
	defer cancel()
	a, bits, err := d.requestAddress(ctx, req)
	if err != nil {
		d.log.Warn("request address failed", "pool", req.PoolID, "address", req.Address, "options", req.Options, "err", err)
		return nil, err
	}
	return &ipam.RequestAddressResponse{Address: netip.PrefixFrom(a, bits).String(), Data: map[string]string{}}, nil
}

// ReleaseAddress frees an address (or this host's reference on a shared
// one). Releasing an address that is not allocated is an error.
func (d *Driver) ReleaseAddress(ctx context.Context, req *ipam.ReleaseAddressRequest) error {
	ctx, cancel := d.opContext(ctx)
	defer cancel()
	if _, err := d.Release(ctx, req.PoolID, req.Address); err != nil {
		d.log.Warn("release address failed", "pool", req.PoolID, "address", req.Address, "err", err)
		return err
	}
	return nil
}

// retries bounds every read-modify-write loop on one key.
const retries = 100

// Error is a failed IPAM request: the message names the problem, Kind is
// one of the Err* values above.
type Error struct {
	Msg  string
	Kind error
}

func (e *Error) Error() string { return e.Msg }
func (e *Error) Unwrap() error { return e.Kind }

// errorf builds an *Error of kind with a message naming the problem.
func errorf(kind error, format string, args ...any) error {
	return &Error{Msg: fmt.Sprintf(format, args...), Kind: kind}
}
