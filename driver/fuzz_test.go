package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/internal/pluginapi"
	"github.com/dnplabs/docker-net-plugin/ipam"
	"github.com/dnplabs/docker-net-plugin/store"
)

// `make fuzz` runs each target for FUZZTIME; `go test` runs their seeds.

var fuzzMethods = []string{
	"Plugin.Activate",
	"NetworkDriver.GetCapabilities", "NetworkDriver.CreateNetwork", "NetworkDriver.AllocateNetwork",
	"NetworkDriver.DeleteNetwork", "NetworkDriver.FreeNetwork", "NetworkDriver.CreateEndpoint",
	"NetworkDriver.DeleteEndpoint", "NetworkDriver.EndpointOperInfo", "NetworkDriver.Join",
	"NetworkDriver.Leave", "NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete",
	"NetworkDriver.ProgramExternalConnectivity", "NetworkDriver.RevokeExternalConnectivity",
	"IpamDriver.GetCapabilities", "IpamDriver.GetDefaultAddressSpaces", "IpamDriver.RequestPool",
	"IpamDriver.ReleasePool", "IpamDriver.RequestAddress", "IpamDriver.ReleaseAddress",
}

// keepNet and keepEP exist before fuzzing starts; no input may harm them
// unless it names keepNet (Docker removing the network or the endpoint).
const (
	keepNet = "8f3c2a9d41b7e6c05d2f8a1b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f"
	keepEP  = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f80"
)

// slowCall is the longest one call may take with the embedded store;
// dockerd gives up on a plugin call after 30 s.
const slowCall = 5 * time.Second

// storeDirs are the store directories the driver and IPAM write.
var storeDirs = []string{overlaysDir, vnisDir, netmapDir, endpointsDir, hostsDir, seenDir, orphansDir, ipam.Dir}

// snapshot is the whole store content, key -> value.
func snapshot(t *testing.T, s store.Store) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, dir := range storeDirs {
		kvs, err := s.List(context.Background(), dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range kvs {
			out[kv.Key] = string(kv.Value)
		}
	}
	return out
}

// logCapture keeps what the router logs for one call.
type logCapture struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logCapture) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logCapture) take() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.buf.String()
	l.buf.Reset()
	return s
}

// FuzzPluginAPI throws malformed and hostile bodies at every plugin call of
// the real router, drivers and embedded store. Each call: never panics,
// answers within slowCall with JSON, and every failure is a clear
// {"Err": ...}; a call that fails leaves the store exactly as it was (bad
// input loses nothing, and writes nothing half); the existing network and
// endpoint stay unless the call names that network (Docker deleting it).
func FuzzPluginAPI(f *testing.F) {
	seeds := []string{
		``, `{}`, `null`, `[]`, `"x"`, `{"NetworkID":42}`, `{"NetworkID":"` + keepNet + `"}`,
		`{"NetworkID":"` + keepNet + `","EndpointID":"` + keepEP + `"}`,
		`{"networkid":"` + keepNet + `"}`,
		`{"NetworkID":"n1","Options":{"com.docker.network.generic":{"vni":"0"}},"IPv4Data":[{"Pool":"10.1.0.0/24"}]}`,
		`{"NetworkID":"n1","Options":{"com.docker.network.generic":"x"},"IPv4Data":[{"Pool":"bad"}]}`,
		`{"NetworkID":"n2","IPv4Data":[{"Pool":"10.2.0.0/24","Gateway":"10.2.0.1/24"}],"IPv6Data":[{"Pool":"fd00::/64"}]}`,
		`{"NetworkID":"n2","EndpointID":"e1","Interface":{"Address":"10.2.0.5/24","MacAddress":"zz"}}`,
		`{"NetworkID":"n2","EndpointID":"e1","Interface":null}`,
		`{"AddressSpace":"dnp-local","Pool":"10.3.0.0/24","SubPool":"10.4.0.0/25","Options":{"a":"b"}}`,
		`{"AddressSpace":"dnp-local","Pool":"10.3.0.0/33"}`, `{"AddressSpace":"","V6":true}`,
		`{"PoolID":"dnp-local/10.3.0.0_24","Address":"10.3.0.300"}`, `{"PoolID":"nope","Address":""}`,
		`{"PoolID":"dnp-local/10.9.0.0_24","Options":{"RequestAddressType":"com.docker.network.gateway"}}`,
		`{"DiscoveryType":1,"DiscoveryData":{"Address":"1.2.3.4"}}`,
		strings.Repeat(`{"a":`, 200) + strings.Repeat(`}`, 200),
	}
	for i, s := range seeds {
		f.Add(uint8(i), []byte(s))
	}
	// The calls that may remove the existing network or endpoint.
	f.Add(uint8(4), []byte(`{"NetworkID":"`+keepNet+`"}`))
	f.Add(uint8(7), []byte(`{"NetworkID":"`+keepNet+`","EndpointID":"`+keepEP+`"}`))

	ctx := context.Background()
	s := openStore(f)
	plane := newFakePlane()
	logs := &logCapture{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelError}))
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	d := New(Config{Store: s, Plane: plane, HostAddr: netip.MustParseAddr("192.0.2.1"), Log: quiet})
	id := ipam.New(s, ipam.Options{HostID: "192.0.2.1", Logger: quiet})
	rt := pluginapi.New(d, id, log, nil)

	restore := func(t testing.TB) {
		t.Helper()
		if _, err := s.Get(ctx, netmapKey("192.0.2.1", keepNet)); err != nil {
			if err := d.CreateNetwork(ctx, createReq(keepNet, "10.77.0.0/24", map[string]string{"overlay": "keep"})); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := s.Get(ctx, endpointKey("keep", keepEP)); err != nil {
			if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: keepNet, EndpointID: keepEP,
				Interface: &network.EndpointInterface{Address: "10.77.0.9/24"}}); err != nil {
				t.Fatal(err)
			}
		}
	}
	restore(f)

	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		method := fuzzMethods[int(which)%len(fuzzMethods)]
		before := snapshot(t, s)
		rec := httptest.NewRecorder()
		start := time.Now()
		rt.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/"+method, bytes.NewReader(body)))
		if took := time.Since(start); took > slowCall {
			t.Errorf("%s %q took %s", method, body, took)
		}
		if logged := logs.take(); strings.Contains(logged, "panicked") {
			t.Fatalf("%s %q: the driver panicked:\n%s", method, body, logged)
		}
		var reply map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &reply); err != nil {
			t.Fatalf("%s %q: reply %q is not a JSON object: %v", method, body, rec.Body.String(), err)
		}
		if rec.Code != http.StatusOK {
			if msg, _ := reply["Err"].(string); msg == "" {
				t.Fatalf("%s %q: status %d without an Err message: %s", method, body, rec.Code, rec.Body.String())
			}
			if after := snapshot(t, s); !maps.Equal(before, after) {
				t.Fatalf("%s %q failed (%s) but changed the store:\n%s", method, body, reply["Err"], storeDiff(before, after))
			}
		}
		// Calls that name the network may remove it, as Docker's do.
		var named struct{ NetworkID string }
		if json.Unmarshal(body, &named) == nil && named.NetworkID == keepNet {
			restore(t)
			return
		}
		if _, err := s.Get(ctx, netmapKey("192.0.2.1", keepNet)); err != nil {
			t.Fatalf("after %s %q the existing network is gone: %v", method, body, err)
		}
		if _, err := s.Get(ctx, endpointKey("keep", keepEP)); err != nil {
			t.Fatalf("after %s %q the existing endpoint is gone: %v", method, body, err)
		}
	})
}

// storeDiff lists what changed between two snapshots.
func storeDiff(before, after map[string]string) string {
	var out []string
	for k, v := range after {
		if w, ok := before[k]; !ok {
			out = append(out, "+ "+k+" = "+v)
		} else if w != v {
			out = append(out, "~ "+k+" = "+v+" (was "+w+")")
		}
	}
	for k := range before {
		if _, ok := after[k]; !ok {
			out = append(out, "- "+k)
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// FuzzPeerRecords feeds the sync path what other hosts wrote to the store,
// untrusted: endpoint and host records with any key and value, put and
// deleted, on top of a healthy cluster (this host with a network and an
// endpoint on overlay keep, a live peer host with one endpoint). The
// reconciliation must not panic and must program only valid peers: a
// live unicast underlay address other than this host's, of its address
// family; a 6-byte unicast MAC other than zero; addresses inside the
// overlay's subnets that are not its network, broadcast or gateway
// address. Only the overlay this host has a network on is built, and the
// healthy peer stays programmed unless a fuzzed record replaces it.
func FuzzPeerRecords(f *testing.F) {
	good := store.KV{Key: endpointKey("keep", "goodep"), Value: []byte(`{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.2/24","mac":"02:00:00:00:00:02"}`)}
	goodHost := store.KV{Key: hostKey("192.0.2.2"), Value: []byte(`{"addr":"192.0.2.2"}`)}
	for _, s := range []struct {
		ep, epVal, host, hostVal string
		op                       uint8
	}{
		{"keep/e1", `{"network":"n9","host":"192.0.2.3","ipv4":"10.77.0.3/24","mac":"02:00:00:00:00:03"}`, "192.0.2.3", `{}`, 3},
		{"keep/e2", `{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.4/24","mac":"ff:ff:ff:ff:ff:ff"}`, "", ``, 1},
		{"keep/e3", `{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.1/24","mac":"02:00:00:00:00:05"}`, "", ``, 1},
		{"keep/e4", `{"network":"n9","host":"0.0.0.0","ipv4":"10.77.0.6/24","mac":"02:00:00:00:00:06"}`, "0.0.0.0", `{}`, 3},
		{"keep/e5", `{"network":"n9","host":"192.0.2.1","ipv4":"10.77.0.7/24","mac":"02:00:00:00:00:07"}`, "", ``, 1},
		{"keep/e6", `{"network":"n9","host":"::ffff:192.0.2.2","ipv4":"10.77.0.8/24","mac":"02:00:00:00:00:08"}`, "::ffff:192.0.2.2", `{}`, 3},
		{"keep/e7", `{"network":"n9","host":"2001:db8::2","ipv4":"10.77.0.10/24","mac":"02:00:00:00:00:0a"}`, "2001:db8::2", `{}`, 3},
		{"keep/e8", `{"network":"n9","host":"192.0.2.2","ipv4":"10.99.0.5/24","mac":"02:00:00:00:00:0b"}`, "", ``, 1},
		{"keep/e9", `{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.11/24","mac":"02:00:00:00:00:0c:0d:0e"}`, "", ``, 1},
		{"keep/e10", `{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.12/24","ipv6":"10.77.0.13/24","mac":"02:00:00:00:00:0d"}`, "", ``, 1},
		{"keep/e11", `{"network":"` + keepNet + `","host":"192.0.2.1","ipv4":"10.77.0.14/24","mac":"02:00:00:00:00:0e"}`, "", ``, 1},
		{"keep/goodep", `{"network":"n9","host":"192.0.2.2","ipv4":"10.77.0.255/24","mac":"02:00:00:00:00:02"}`, "", ``, 1},
		{"keep/goodep", ``, "192.0.2.2", ``, 12},
		{"other/e1", `{"network":"n9","host":"192.0.2.2","ipv4":"10.78.0.2/24","mac":"02:00:00:00:00:0f"}`, "", ``, 1},
		{"../keep/x", `null`, "", ``, 1},
		{"keep/e12", `{"host":1}`, "x", `[`, 3},
	} {
		f.Add(s.ep, []byte(s.epVal), s.host, []byte(s.hostVal), s.op)
	}

	ctx := context.Background()
	s := openStore(f)
	plane := &checkingPlane{fakePlane: newFakePlane()}
	self := netip.MustParseAddr("192.0.2.1")
	d := New(Config{Store: s, Plane: plane, HostAddr: self, Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := d.CreateNetwork(ctx, createReq(keepNet, "10.77.0.0/24", map[string]string{"overlay": "keep"})); err != nil {
		f.Fatal(err)
	}
	if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: keepNet, EndpointID: keepEP,
		Interface: &network.EndpointInterface{Address: "10.77.0.9/24"}}); err != nil {
		f.Fatal(err)
	}
	n, err := d.network(ctx, keepNet)
	if err != nil {
		f.Fatal(err)
	}
	keep := overlayOf(n)
	p := d.peers

	f.Fuzz(func(t *testing.T, epKey string, epVal []byte, hostKeyS string, hostVal []byte, op uint8) {
		epKV := store.KV{Key: endpointsDir + "/" + epKey, Value: epVal}
		hostKV := store.KV{Key: hostsDir + "/" + hostKeyS, Value: hostVal}
		// A healthy cluster, as the watches' first snapshots deliver it.
		local := store.KV{Key: endpointKey("keep", keepEP), Value: encode(endpointRecord{Network: keepNet, Host: self.String(), IPv4: "10.77.0.9/24", MAC: "02:00:00:00:00:09"})}
		p.applyEndpoint(store.Event{Type: store.EventReset, Snapshot: []store.KV{good, local}})
		p.applyHost(store.Event{Type: store.EventReset, Snapshot: []store.KV{goodHost, {Key: hostKey(self.String())}}})
		// What the fuzzer wrote or deleted.
		if op&1 != 0 {
			p.applyEndpoint(store.Event{Type: store.EventPut, KV: epKV})
		}
		if op&2 != 0 {
			p.applyHost(store.Event{Type: store.EventPut, KV: hostKV})
		}
		if op&4 != 0 {
			p.applyEndpoint(store.Event{Type: store.EventDelete, KV: store.KV{Key: epKV.Key}})
		}
		if op&8 != 0 {
			p.applyHost(store.Event{Type: store.EventDelete, KV: store.KV{Key: hostKV.Key}})
		}
		if op&16 != 0 {
			p.applyEndpoint(store.Event{Type: store.EventReset, Snapshot: []store.KV{good, local, epKV}})
		}
		plane.reset()
		p.reconcile(ctx) // errors are fine; what it programs is checked

		live := func(h netip.Addr) bool { return p.hosts[h.String()] }
		for _, ov := range plane.ensured {
			if ov.VNI != keep.VNI {
				t.Fatalf("built overlay %+v; this host has a network only on overlay keep (vni %d)", ov, keep.VNI)
			}
		}
		for vni, peers := range plane.set {
			if vni != keep.VNI {
				t.Fatalf("programmed peers on vni %d, not an overlay of this host", vni)
			}
			for _, peer := range peers {
				if why := invalidPeer(peer, keep, self, live); why != "" {
					t.Fatalf("programmed an invalid peer %+v: %s", peer, why)
				}
			}
		}
		// The healthy peer is there, unless a fuzzed record took its key,
		// its host, its MAC or its address.
		replaced := epKV.Key == good.Key || hostKV.Key == goodHost.Key || bytes.Contains(epVal, []byte("02:00:00:00:00:02")) ||
			bytes.Contains(epVal, []byte("10.77.0.2"))
		if !replaced && !slices.ContainsFunc(plane.set[keep.VNI], func(p Peer) bool { return p.MAC.String() == "02:00:00:00:00:02" }) {
			t.Fatalf("the healthy peer is no longer programmed after %q=%q / %q=%q op %d: %+v", epKV.Key, epVal, hostKV.Key, hostVal, op, plane.set)
		}
	})
}

// invalidPeer says what is wrong with a programmed peer, or "".
func invalidPeer(p Peer, ov Overlay, self netip.Addr, live func(netip.Addr) bool) string {
	h := p.Host
	switch {
	case !h.IsValid() || h.IsUnspecified() || h.IsMulticast() || h.IsLoopback() || h.IsLinkLocalUnicast():
		return "not a unicast underlay address"
	case h == self || h.Unmap() == self:
		return "this host's own address"
	case h.Is4() != self.Is4():
		return "another address family than this host's"
	case !live(h):
		return "not a live host"
	case len(p.MAC) != 6 || p.MAC[0]&1 != 0 || bytes.Equal(p.MAC, net.HardwareAddr{0, 0, 0, 0, 0, 0}):
		return "not a 6-byte unicast MAC"
	case len(p.IPs) == 0:
		return "no address"
	}
	for _, ip := range p.IPs {
		in := false
		for i, s := range ov.Subnets {
			if !s.Contains(ip) {
				continue
			}
			in = true
			if ip == s.Masked().Addr() || ip.Is4() && ip == lastAddr(s) || i < len(ov.Gateways) && ip == ov.Gateways[i] {
				return "address " + ip.String() + " is the network, broadcast or gateway address"
			}
		}
		if !in {
			return "address " + ip.String() + " outside the overlay's subnets"
		}
	}
	return ""
}

// checkingPlane records what one reconciliation programs.
type checkingPlane struct {
	*fakePlane
	mu      sync.Mutex
	ensured []Overlay
	set     map[uint32][]Peer
}

func (c *checkingPlane) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ensured, c.set = nil, map[uint32][]Peer{}
}

func (c *checkingPlane) EnsureOverlay(ov Overlay) error {
	c.mu.Lock()
	c.ensured = append(c.ensured, ov)
	c.mu.Unlock()
	return c.fakePlane.EnsureOverlay(ov)
}

func (c *checkingPlane) SetPeers(vni uint32, peers []Peer) (int, error) {
	c.mu.Lock()
	c.set[vni] = slices.Clone(peers)
	c.mu.Unlock()
	return c.fakePlane.SetPeers(vni, peers)
}

func (c *checkingPlane) UpdatePeers(vni uint32, d PeerDelta) (int, error) {
	n, err := c.fakePlane.UpdatePeers(vni, d)
	c.fakePlane.mu.Lock()
	peers := slices.Clone(c.fakePlane.peers[vni])
	c.fakePlane.mu.Unlock()
	c.mu.Lock()
	c.set[vni] = peers
	c.mu.Unlock()
	return n, err
}
