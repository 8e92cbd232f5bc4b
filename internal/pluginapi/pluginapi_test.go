package pluginapi

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"
)

// fakeNet answers every call; CreateNetwork fails and Leave panics, so the
// tests can see how the router reports both.
type fakeNet struct {
	created *network.CreateEndpointRequest
}

func (f *fakeNet) GetCapabilities(context.Context) (*network.CapabilitiesResponse, error) {
	return &network.CapabilitiesResponse{Scope: "local", ConnectivityScope: "global"}, nil
}
func (f *fakeNet) CreateNetwork(_ context.Context, r *network.CreateNetworkRequest) error {
	return errors.New("subnet clash on " + r.NetworkID)
}
func (f *fakeNet) AllocateNetwork(context.Context, *network.AllocateNetworkRequest) (*network.AllocateNetworkResponse, error) {
	return nil, nil
}
func (f *fakeNet) DeleteNetwork(context.Context, *network.DeleteNetworkRequest) error { return nil }
func (f *fakeNet) FreeNetwork(context.Context, *network.FreeNetworkRequest) error     { return nil }
func (f *fakeNet) CreateEndpoint(_ context.Context, r *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error) {
	f.created = r
	return &network.CreateEndpointResponse{}, nil
}
func (f *fakeNet) DeleteEndpoint(context.Context, *network.DeleteEndpointRequest) error { return nil }
func (f *fakeNet) EndpointInfo(context.Context, *network.InfoRequest) (*network.InfoResponse, error) {
	return &network.InfoResponse{Value: map[string]string{}}, nil
}
func (f *fakeNet) Join(context.Context, *network.JoinRequest) (*network.JoinResponse, error) {
	return &network.JoinResponse{InterfaceName: network.InterfaceName{SrcName: "veth0", DstPrefix: "eth"}}, nil
}
func (f *fakeNet) Leave(context.Context, *network.LeaveRequest) error { panic("boom") }
func (f *fakeNet) DiscoverNew(context.Context, *network.DiscoveryNotification) error {
	return nil
}
func (f *fakeNet) DiscoverDelete(context.Context, *network.DiscoveryNotification) error {
	return nil
}
func (f *fakeNet) ProgramExternalConnectivity(context.Context, *network.ProgramExternalConnectivityRequest) error {
	return nil
}
func (f *fakeNet) RevokeExternalConnectivity(context.Context, *network.RevokeExternalConnectivityRequest) error {
	return nil
}

type fakeIpam struct{}

func (fakeIpam) GetCapabilities(context.Context) (*ipam.CapabilitiesResponse, error) {
	return &ipam.CapabilitiesResponse{}, nil
}
func (fakeIpam) GetDefaultAddressSpaces(context.Context) (*ipam.AddressSpacesResponse, error) {
	return &ipam.AddressSpacesResponse{LocalDefaultAddressSpace: "l", GlobalDefaultAddressSpace: "g"}, nil
}
func (fakeIpam) RequestPool(context.Context, *ipam.RequestPoolRequest) (*ipam.RequestPoolResponse, error) {
	return &ipam.RequestPoolResponse{PoolID: "p", Pool: "10.0.0.0/24"}, nil
}
func (fakeIpam) ReleasePool(context.Context, *ipam.ReleasePoolRequest) error { return nil }
func (fakeIpam) RequestAddress(context.Context, *ipam.RequestAddressRequest) (*ipam.RequestAddressResponse, error) {
	return &ipam.RequestAddressResponse{Address: "10.0.0.2/24"}, nil
}
func (fakeIpam) ReleaseAddress(context.Context, *ipam.ReleaseAddressRequest) error { return nil }

func post(t *testing.T, h http.Handler, path, body string) (int, map[string]any) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, strings.NewReader(body)))
	raw, _ := io.ReadAll(rec.Body)
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		t.Fatalf("%s: reply %q is not a JSON object: %v", path, raw, err)
	}
	return rec.Code, out
}

func newRouter(n *fakeNet) *Router {
	return New(n, fakeIpam{}, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
}

func TestActivateListsBothDrivers(t *testing.T) {
	code, out := post(t, newRouter(&fakeNet{}), "/Plugin.Activate", "")
	impl, _ := out["Implements"].([]any)
	if code != 200 || len(impl) != 2 || impl[0] != "NetworkDriver" || impl[1] != "IpamDriver" {
		t.Fatalf("activate: %d %v", code, out)
	}
}

func TestCallsReachTheDrivers(t *testing.T) {
	n := &fakeNet{}
	rt := newRouter(n)
	code, out := post(t, rt, "/IpamDriver.RequestAddress", `{"PoolID":"p"}`)
	if code != 200 || out["Address"] != "10.0.0.2/24" {
		t.Fatalf("RequestAddress: %d %v", code, out)
	}
	code, out = post(t, rt, "/NetworkDriver.CreateEndpoint", `{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.0.0.2/24"}}`)
	if code != 200 || n.created == nil || n.created.Interface.Address != "10.0.0.2/24" {
		t.Fatalf("CreateEndpoint: %d %v, driver saw %+v", code, out, n.created)
	}
	code, out = post(t, rt, "/NetworkDriver.Join", `{"NetworkID":"n1","EndpointID":"e1"}`)
	if iface, _ := out["InterfaceName"].(map[string]any); code != 200 || iface["SrcName"] != "veth0" {
		t.Fatalf("Join: %d %v", code, out)
	}
}

func TestErrorsAreReportedInErr(t *testing.T) {
	rt := newRouter(&fakeNet{})
	for _, c := range []struct{ path, body, want string }{
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":"n1"}`, "subnet clash on n1"},
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":`, "cannot decode the JSON body"},
		{"/NetworkDriver.CreateNetwork", `{"NetworkID":42}`, "cannot decode"},
		{"/NetworkDriver.Leave", `{}`, "internal error in NetworkDriver.Leave: boom"},
		{"/NetworkDriver.Nope", `{}`, "unknown plugin call /NetworkDriver.Nope"},
	} {
		code, out := post(t, rt, c.path, c.body)
		msg, _ := out["Err"].(string)
		if code == 200 || !strings.Contains(msg, c.want) {
			t.Errorf("%s %s: %d %v, want an Err containing %q", c.path, c.body, code, out, c.want)
		}
	}
}

func TestHugeBodyIsRefused(t *testing.T) {
	body := `{"NetworkID":"` + strings.Repeat("x", MaxBody+10) + `"}`
	code, out := post(t, newRouter(&fakeNet{}), "/NetworkDriver.CreateNetwork", body)
	if msg, _ := out["Err"].(string); code != 400 || !strings.Contains(msg, "too large") {
		t.Fatalf("huge body: %d %v", code, out)
	}
}

func TestSocketIsNotWorldWritable(t *testing.T) {
	path := t.TempDir() + "/p.sock"
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		t.Fatalf("socket mode %v: group or others may use it", perm)
	}
	// A second plugin process must not steal a live socket.
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second Listen on a live socket: %v", err)
	}
}

// TestSocketIsPrivateFromCreation: the socket never exists at its path with
// a mode wider than 0600, whatever the umask: it arrives there by a rename
// (IN_MOVED_TO), already 0600, and is never created there in place
// (IN_CREATE), which would leave a moment before a chmod.
func TestSocketIsPrivateFromCreation(t *testing.T) {
	old := unix.Umask(0) // a naive listen would now make the socket 0777
	defer unix.Umask(old)
	dir := t.TempDir()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO); err != nil {
		t.Fatal(err)
	}
	l, err := Listen(filepath.Join(dir, "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Addr().String() != filepath.Join(dir, "p.sock") {
		t.Errorf("listener address %s, want the socket's path", l.Addr())
	}
	buf := make([]byte, 64*1024)
	n, err := unix.Read(fd, buf)
	if err != nil {
		t.Fatal(err)
	}
	arrived := false
	for off := 0; off+unix.SizeofInotifyEvent <= n; {
		ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
		name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+int(ev.Len)]), "\x00")
		off += unix.SizeofInotifyEvent + int(ev.Len)
		if name != "p.sock" {
			continue
		}
		if ev.Mask&unix.IN_CREATE != 0 {
			t.Errorf("the socket was created at its path (IN_CREATE), with the mode of the umask until a chmod")
		}
		if ev.Mask&unix.IN_MOVED_TO != 0 {
			arrived = true
		}
	}
	if !arrived {
		t.Errorf("the socket did not arrive at its path by a rename")
	}
	fi, err := os.Stat(filepath.Join(dir, "p.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("socket mode %v, want 0600", perm)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, ".s*")); len(left) != 0 {
		t.Errorf("private directories left next to the socket: %v", left)
	}
}

// TestRefuseAnswersOnlyTheHandshake: while the plugin refuses to work,
// every call but the handshake fails with the reason; the drivers are
// not called.
func TestRefuseAnswersOnlyTheHandshake(t *testing.T) {
	n := &fakeNet{}
	rt := newRouter(n)
	var why error = errors.New("another machine holds this address")
	rt.Refuse(func() error { return why })
	for _, path := range []string{"/Plugin.Activate", "/NetworkDriver.GetCapabilities", "/IpamDriver.GetCapabilities", "/IpamDriver.GetDefaultAddressSpaces"} {
		if code, out := post(t, rt, path, ""); code != 200 {
			t.Errorf("%s while refusing: %d %v", path, code, out)
		}
	}
	for _, path := range []string{"/IpamDriver.RequestPool", "/NetworkDriver.CreateEndpoint"} {
		code, out := post(t, rt, path, `{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.0.0.2/24"}}`)
		if msg, _ := out["Err"].(string); code == 200 || msg != why.Error() {
			t.Errorf("%s while refusing: %d %v, want Err %q", path, code, out, why)
		}
	}
	if n.created != nil {
		t.Errorf("CreateEndpoint reached the driver while refusing")
	}
	why = nil
	if code, out := post(t, rt, "/IpamDriver.RequestPool", `{}`); code != 200 {
		t.Errorf("RequestPool once no longer refusing: %d %v", code, out)
	}
}
