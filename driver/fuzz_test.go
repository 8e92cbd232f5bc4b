package driver

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/internal/pluginapi"
	"github.com/dnplabs/docker-net-plugin/ipam"
)

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

// keepNet and keepEP exist before fuzzing starts; no input may harm them.
const (
	keepNet = "8f3c2a9d41b7e6c05d2f8a1b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f"
	keepEP  = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f80"
)

// FuzzPluginAPI throws malformed and hostile bodies at every plugin call of
// the real router, drivers and embedded store: never a panic, every failure
// a clear {"Err": ...}, and an existing network and endpoint stay intact.
func FuzzPluginAPI(f *testing.F) {
	seeds := []string{
		``, `{}`, `null`, `[]`, `"x"`, `{"NetworkID":42}`, `{"NetworkID":"` + keepNet + `"}`,
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
	ctx := context.Background()
	s := openStore(f)
	plane := newFakePlane()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	d := New(Config{Store: s, Plane: plane, HostAddr: netip.MustParseAddr("192.0.2.1"), Log: quiet})
	id := ipam.New(s, ipam.Options{HostID: "192.0.2.1", Logger: quiet})
	rt := pluginapi.New(d, id, quiet, nil)

	if err := d.CreateNetwork(ctx, createReq(keepNet, "10.77.0.0/24", map[string]string{"overlay": "keep"})); err != nil {
		f.Fatal(err)
	}
	if _, err := d.CreateEndpoint(ctx, &network.CreateEndpointRequest{NetworkID: keepNet, EndpointID: keepEP,
		Interface: &network.EndpointInterface{Address: "10.77.0.9/24"}}); err != nil {
		f.Fatal(err)
	}

	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		method := fuzzMethods[int(which)%len(fuzzMethods)]
		rec := httptest.NewRecorder()
		rt.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/"+method, strings.NewReader(string(body))))
		var reply map[string]any
		if err := json.Unmarshal(rec.Body.Bytes(), &reply); err != nil && rec.Body.String() != "null\n" {
			t.Fatalf("%s %q: reply %q is not JSON: %v", method, body, rec.Body.String(), err)
		}
		if rec.Code != http.StatusOK {
			msg, _ := reply["Err"].(string)
			if msg == "" {
				t.Fatalf("%s %q: status %d without an Err message: %s", method, body, rec.Code, rec.Body.String())
			}
			if strings.Contains(msg, "internal error") {
				t.Fatalf("%s %q: the driver panicked: %s", method, body, msg)
			}
		}
		if _, err := s.Get(ctx, netmapKey("192.0.2.1", keepNet)); err != nil {
			t.Fatalf("after %s %q the existing network is gone: %v", method, body, err)
		}
		if _, err := s.Get(ctx, endpointKey("keep", keepEP)); err != nil {
			t.Fatalf("after %s %q the existing endpoint is gone: %v", method, body, err)
		}
	})
}
