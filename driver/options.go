package driver

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/ipam"
)

// The -o options users give to `docker network create -d dnp`.
const (
	OptOverlay = "overlay" // cluster-wide overlay name; default: derived from the IPv4 subnet
	OptVNI     = "vni"     // VXLAN network identifier 1..16777215; default: allocated in the store
	OptEncap   = "encap"   // vxlan (default) or gre
	OptMTU     = "mtu"     // container MTU; default: underlay MTU minus the encapsulation overhead
	// OptIPAMRange opts a network whose addresses come from another IPAM
	// driver than the plugin's (Docker's default one hands out addresses
	// per host) into an overlay anyway: its value is this host's range(s),
	// comma-separated CIDRs, disjoint from every other host's.
	OptIPAMRange = "uncoordinated-ipam-range"
	// OptEncrypted encrypts the overlay's traffic between hosts: -o encrypted
	// (Docker's overlay driver's spelling) or encrypted=true.
	OptEncrypted = "encrypted"
)

var knownOptions = []string{OptOverlay, OptVNI, OptEncap, OptMTU, OptIPAMRange, OptEncrypted}

// Keys libnetwork puts in CreateNetwork's Options.
const (
	genericKey  = "com.docker.network.generic"
	internalKey = "com.docker.network.internal"
	ipv6Key     = "com.docker.network.enable_ipv6"
)

// netSpec is what one host's `docker network create` asked for.
type netSpec struct {
	Overlay  string
	VNI      uint32 // 0: allocate
	Encap    string
	MTU      int // 0: derive from the underlay
	Internal bool
	// Encrypted: VXLAN between hosts is encrypted (see docs/encryption.md).
	Encrypted bool
	Subnets   []netip.Prefix // IPv4 first
	Gateways  []netip.Addr   // same order as Subnets; may be invalid (none)
	// Swarm is the cluster-wide Docker network ID of a swarm network
	// (drivers of scope global); empty for a plain host's network.
	Swarm string
	// Ranges are the ranges of -o uncoordinated-ipam-range; Uncoordinated
	// says the addresses come from another IPAM driver than the plugin's.
	Ranges        []netip.Prefix
	Uncoordinated bool
}

// parseCreate turns a CreateNetwork request into a netSpec, rejecting
// anything unknown or malformed with an error that names it.
func parseCreate(r *network.CreateNetworkRequest) (netSpec, error) {
	opts, err := userOptions(r.Options)
	if err != nil {
		return netSpec{}, err
	}
	spec, err := parseSpec(opts, append(append([]*network.IPAMData{}, r.IPv4Data...), r.IPv6Data...))
	spec.Internal = boolOption(r.Options[internalKey])
	return spec, err
}

// parseSpec reads the -o options and the subnets of a network.
func parseSpec(opts map[string]string, ipamData []*network.IPAMData) (netSpec, error) {
	spec := netSpec{Encap: "vxlan"}
	for k, v := range opts {
		switch k {
		case OptOverlay:
			if !validName(v) {
				return spec, fmt.Errorf("option overlay=%q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", v)
			}
			spec.Overlay = v
		case OptVNI:
			n, err := strconv.ParseUint(v, 10, 32)
			if err != nil || n < 1 || n > 1<<24-1 {
				return spec, fmt.Errorf("option vni=%q: want a number from 1 to 16777215", v)
			}
			spec.VNI = uint32(n)
		case OptEncap:
			if v != "vxlan" && v != "gre" {
				return spec, fmt.Errorf("option encap=%q: want vxlan or gre", v)
			}
			spec.Encap = v
		case OptMTU:
			n, err := strconv.Atoi(v)
			if err != nil || n < 576 || n > 9000 {
				return spec, fmt.Errorf("option mtu=%q: want a number from 576 to 9000", v)
			}
			spec.MTU = n
		case OptIPAMRange:
			for _, f := range strings.Split(v, ",") {
				p, err := netip.ParsePrefix(strings.TrimSpace(f))
				if err != nil {
					return spec, fmt.Errorf("option %s=%q: want comma-separated CIDR ranges, e.g. 10.88.0.0/25: %v", OptIPAMRange, v, err)
				}
				spec.Ranges = append(spec.Ranges, p.Masked())
			}
		case OptEncrypted:
			on, err := encryptedValue(v)
			if err != nil {
				return spec, err
			}
			spec.Encrypted = on
		default:
			return spec, fmt.Errorf("unknown option %q (known: %s)", k, strings.Join(knownOptions, ", "))
		}
	}
	for _, data := range ipamData {
		if data == nil || data.Pool == "" {
			continue
		}
		p, err := netip.ParsePrefix(data.Pool)
		if err != nil {
			return spec, fmt.Errorf("subnet %q: %v", data.Pool, err)
		}
		var gw netip.Addr
		if data.Gateway != "" {
			gp, err := netip.ParsePrefix(data.Gateway)
			if err != nil {
				// A bare address, as a swarm manager may give it.
				a, aerr := netip.ParseAddr(data.Gateway)
				if aerr != nil {
					return spec, fmt.Errorf("gateway %q: %v", data.Gateway, err)
				}
				gp = netip.PrefixFrom(a, p.Bits())
			}
			gw = gp.Addr()
			if !p.Masked().Contains(gw) {
				return spec, fmt.Errorf("gateway %s is not inside subnet %s", gw, p.Masked())
			}
		}
		if p.Addr().Zone() != "" {
			return spec, fmt.Errorf("subnet %q: zones are not supported", data.Pool)
		}
		for _, other := range spec.Subnets {
			if other.Overlaps(p) {
				return spec, fmt.Errorf("subnets %s and %s overlap", other, p.Masked())
			}
		}
		spec.Subnets = append(spec.Subnets, p.Masked())
		spec.Gateways = append(spec.Gateways, gw)
	}
	if spec.Encrypted && spec.Encap != "vxlan" {
		return spec, fmt.Errorf("option encrypted: works with encap vxlan only, not %s", spec.Encap)
	}
	if len(spec.Subnets) == 0 || !spec.Subnets[0].Addr().Is4() {
		return spec, fmt.Errorf("the network needs an IPv4 subnet (use --ipam-driver with this plugin, or --subnet)")
	}
	if spec.Overlay == "" {
		spec.Overlay = "net-" + strings.NewReplacer(".", "-", "/", "-").Replace(spec.Subnets[0].String())
	}
	for i, r := range spec.Ranges {
		if !slices.ContainsFunc(spec.Subnets, func(s netip.Prefix) bool { return s.Bits() <= r.Bits() && s.Contains(r.Addr()) }) {
			return spec, fmt.Errorf("option %s: range %s is inside none of the network's subnets %v", OptIPAMRange, r, spec.Subnets)
		}
		for _, o := range spec.Ranges[:i] {
			if o.Overlaps(r) {
				return spec, fmt.Errorf("option %s: ranges %s and %s overlap", OptIPAMRange, o, r)
			}
		}
	}
	return spec, nil
}

// ipamSpace is the address space Docker says the network's addresses come
// from, "" when the request names none.
func ipamSpace(r *network.CreateNetworkRequest) string {
	for _, list := range [][]*network.IPAMData{r.IPv4Data, r.IPv6Data} {
		for _, d := range list {
			if d != nil && d.AddressSpace != ipam.LocalSpace && d.AddressSpace != ipam.GlobalSpace {
				return d.AddressSpace
			}
		}
	}
	for _, list := range [][]*network.IPAMData{r.IPv4Data, r.IPv6Data} {
		for _, d := range list {
			if d != nil {
				return d.AddressSpace
			}
		}
	}
	return ""
}

// ownIPAM says whether an address space is one of the plugin's IPAM driver.
func ownIPAM(space string) bool { return space == ipam.LocalSpace || space == ipam.GlobalSpace }

// errForeignIPAM explains why a network whose addresses come from another
// IPAM driver is refused, and what to type instead.
func errForeignIPAM(space string) error {
	what := fmt.Sprintf("address space %q", space)
	if space == "LocalDefault" || space == "GlobalDefault" {
		what += ", Docker's default IPAM driver"
	}
	return fmt.Errorf("this network's addresses come from another IPAM driver than this plugin's (%s), which hands them out on each host alone: "+
		"containers on different hosts would get the same address on one overlay. "+
		"Create it with this plugin as IPAM driver too: --ipam-driver with the same name as -d (e.g. -d dnp --ipam-driver dnp; "+
		"in Compose, under the network: \"ipam: driver: dnp\"). "+
		"To keep another IPAM driver, give each host a range of its own: --ip-range R -o %s=R", what, OptIPAMRange)
}

var (
	namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)
	idPattern   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)
)

// validID checks a network or endpoint ID before it goes into a store key:
// Docker's are 64 hex digits (swarm networks': 25 letters and digits).
func validID(what, id string) error {
	if !idPattern.MatchString(id) {
		return fmt.Errorf("invalid %s ID %q: want 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit", what, id)
	}
	return nil
}

// userOptions returns the -o options, which libnetwork passes as a map
// under com.docker.network.generic.
func userOptions(all map[string]interface{}) (map[string]string, error) {
	out := map[string]string{}
	raw, ok := all[genericKey]
	if !ok || raw == nil {
		return out, nil
	}
	m, ok := raw.(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("options: %s is a %T, want an object", genericKey, raw)
	}
	for k, v := range m {
		s, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("option %s: value %v is a %T, want a string", k, v, v)
		}
		out[k] = s
	}
	return out, nil
}

// encryptedValue reads -o encrypted: no value (Docker's form) or a boolean.
func encryptedValue(v string) (bool, error) {
	if v == "" {
		return true, nil
	}
	on, err := strconv.ParseBool(v)
	if err != nil {
		return false, fmt.Errorf("option encrypted=%q: want no value, true or false", v)
	}
	return on, nil
}

func boolOption(v interface{}) bool {
	switch b := v.(type) {
	case bool:
		return b
	case string:
		ok, _ := strconv.ParseBool(b)
		return ok
	}
	return false
}

// validName says whether s is an overlay name: 1-64 letters, digits, '.',
// '_' or '-', starting with a letter or digit (so never "." or "..").
func validName(s string) bool { return namePattern.MatchString(s) }
