package driver

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/docker/go-plugins-helpers/network"
)

// The -o options users give to `docker network create -d dnp`.
const (
	OptOverlay = "overlay" // cluster-wide overlay name; default: derived from the IPv4 subnet
	OptVNI     = "vni"     // VXLAN network identifier 1..16777215; default: allocated in the store
	OptEncap   = "encap"   // vxlan (default) or gre
	OptMTU     = "mtu"     // container MTU; default: underlay MTU minus the encapsulation overhead
	// OptEncrypted encrypts the overlay's traffic between hosts: -o encrypted
	// (Docker's overlay driver's spelling) or encrypted=true.
	OptEncrypted = "encrypted"
)

var knownOptions = []string{OptOverlay, OptVNI, OptEncap, OptMTU, OptEncrypted}

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
				return spec, fmt.Errorf("option overlay=%q: use 1-48 letters, digits, '.', '_' or '-'", v)
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
	return spec, nil
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

func validName(s string) bool {
	if len(s) == 0 || len(s) > 48 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// sortedKeys is for stable messages.
func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
