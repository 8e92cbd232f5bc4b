// Package pluginapi serves the libnetwork remote-driver protocol: one unix
// socket, one router, answering Plugin.Activate and every NetworkDriver and
// IpamDriver call. Request and response bodies are go-plugins-helpers'
// types; the drivers behind it are plain Go interfaces that take a context.
package pluginapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"time"

	"github.com/docker/go-plugins-helpers/ipam"
	"github.com/docker/go-plugins-helpers/network"
)

// NetworkDriver is what the router needs from the network driver.
type NetworkDriver interface {
	GetCapabilities(ctx context.Context) (*network.CapabilitiesResponse, error)
	CreateNetwork(ctx context.Context, r *network.CreateNetworkRequest) error
	AllocateNetwork(ctx context.Context, r *network.AllocateNetworkRequest) (*network.AllocateNetworkResponse, error)
	DeleteNetwork(ctx context.Context, r *network.DeleteNetworkRequest) error
	FreeNetwork(ctx context.Context, r *network.FreeNetworkRequest) error
	CreateEndpoint(ctx context.Context, r *network.CreateEndpointRequest) (*network.CreateEndpointResponse, error)
	DeleteEndpoint(ctx context.Context, r *network.DeleteEndpointRequest) error
	EndpointInfo(ctx context.Context, r *network.InfoRequest) (*network.InfoResponse, error)
	Join(ctx context.Context, r *network.JoinRequest) (*network.JoinResponse, error)
	Leave(ctx context.Context, r *network.LeaveRequest) error
	DiscoverNew(ctx context.Context, r *network.DiscoveryNotification) error
	DiscoverDelete(ctx context.Context, r *network.DiscoveryNotification) error
	ProgramExternalConnectivity(ctx context.Context, r *network.ProgramExternalConnectivityRequest) error
	RevokeExternalConnectivity(ctx context.Context, r *network.RevokeExternalConnectivityRequest) error
}

// IpamDriver is what the router needs from the IPAM driver.
type IpamDriver interface {
	GetCapabilities(ctx context.Context) (*ipam.CapabilitiesResponse, error)
	GetDefaultAddressSpaces(ctx context.Context) (*ipam.AddressSpacesResponse, error)
	RequestPool(ctx context.Context, r *ipam.RequestPoolRequest) (*ipam.RequestPoolResponse, error)
	ReleasePool(ctx context.Context, r *ipam.ReleasePoolRequest) error
	RequestAddress(ctx context.Context, r *ipam.RequestAddressRequest) (*ipam.RequestAddressResponse, error)
	ReleaseAddress(ctx context.Context, r *ipam.ReleaseAddressRequest) error
}

// ContentType is what dockerd expects plugin replies to be labelled with.
const ContentType = "application/vnd.docker.plugins.v1.2+json"

// MaxBody bounds a request body; dockerd's are a few kilobytes.
const MaxBody = 1 << 20

// CallTimeout bounds one call; dockerd gives up on a plugin after about 30s.
const CallTimeout = 25 * time.Second

// Observer is told about every call (for metrics); it may be nil.
type Observer func(method string, took time.Duration, err error)

// Router is the http.Handler for the plugin socket.
type Router struct {
	mux     *http.ServeMux
	log     *slog.Logger
	observe Observer
	refused func() error
}

// handshake are the calls dockerd makes to find out what the plugin is;
// they are answered even while the plugin refuses to work (see Refuse), so
// that users see the refusal's reason on their own commands.
var handshake = map[string]bool{
	"Plugin.Activate":                    true,
	"NetworkDriver.GetCapabilities":      true,
	"IpamDriver.GetCapabilities":         true,
	"IpamDriver.GetDefaultAddressSpaces": true,
}

// Refuse makes every call but the handshake fail with the error refused
// returns, whenever it returns one. Call it before serving.
func (rt *Router) Refuse(refused func() error) { rt.refused = refused }

// New builds the router for both drivers.
func New(nd NetworkDriver, id IpamDriver, log *slog.Logger, observe Observer) *Router {
	if log == nil {
		log = slog.Default()
	}
	rt := &Router{mux: http.NewServeMux(), log: log, observe: observe}
	rt.add("Plugin.Activate", noBody(func(ctx context.Context) (any, error) {
		return map[string][]string{"Implements": {"NetworkDriver", "IpamDriver"}}, nil
	}))

	rt.add("NetworkDriver.GetCapabilities", noBody(func(ctx context.Context) (any, error) { return nd.GetCapabilities(ctx) }))
	rt.add("NetworkDriver.CreateNetwork", errOnly(nd.CreateNetwork))
	rt.add("NetworkDriver.AllocateNetwork", reply(nd.AllocateNetwork))
	rt.add("NetworkDriver.DeleteNetwork", errOnly(nd.DeleteNetwork))
	rt.add("NetworkDriver.FreeNetwork", errOnly(nd.FreeNetwork))
	rt.add("NetworkDriver.CreateEndpoint", reply(nd.CreateEndpoint))
	rt.add("NetworkDriver.DeleteEndpoint", errOnly(nd.DeleteEndpoint))
	rt.add("NetworkDriver.EndpointOperInfo", reply(nd.EndpointInfo))
	rt.add("NetworkDriver.Join", reply(nd.Join))
	rt.add("NetworkDriver.Leave", errOnly(nd.Leave))
	rt.add("NetworkDriver.DiscoverNew", errOnly(nd.DiscoverNew))
	rt.add("NetworkDriver.DiscoverDelete", errOnly(nd.DiscoverDelete))
	rt.add("NetworkDriver.ProgramExternalConnectivity", errOnly(nd.ProgramExternalConnectivity))
	rt.add("NetworkDriver.RevokeExternalConnectivity", errOnly(nd.RevokeExternalConnectivity))

	rt.add("IpamDriver.GetCapabilities", noBody(func(ctx context.Context) (any, error) { return id.GetCapabilities(ctx) }))
	rt.add("IpamDriver.GetDefaultAddressSpaces", noBody(func(ctx context.Context) (any, error) { return id.GetDefaultAddressSpaces(ctx) }))
	rt.add("IpamDriver.RequestPool", reply(id.RequestPool))
	rt.add("IpamDriver.ReleasePool", errOnly(id.ReleasePool))
	rt.add("IpamDriver.RequestAddress", reply(id.RequestAddress))
	rt.add("IpamDriver.ReleaseAddress", errOnly(id.ReleaseAddress))

	rt.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, errorBody{Err: fmt.Sprintf("unknown plugin call %s", r.URL.Path)})
	})
	return rt
}

// ServeHTTP implements http.Handler.
func (rt *Router) ServeHTTP(w http.ResponseWriter, r *http.Request) { rt.mux.ServeHTTP(w, r) }

// call decodes a request body (if any), runs the driver and returns its reply.
type call func(ctx context.Context, body []byte) (any, error)

// errBadRequest marks a body that could not be decoded.
var errBadRequest = errors.New("bad request")

func decode[Req any](body []byte) (*Req, error) {
	req := new(Req)
	if len(body) == 0 {
		return req, nil
	}
	if err := json.Unmarshal(body, req); err != nil {
		return nil, fmt.Errorf("%w: cannot decode the JSON body: %v", errBadRequest, err)
	}
	return req, nil
}

func reply[Req, Resp any](fn func(context.Context, *Req) (*Resp, error)) call {
	return func(ctx context.Context, body []byte) (any, error) {
		req, err := decode[Req](body)
		if err != nil {
			return nil, err
		}
		resp, err := fn(ctx, req)
		if err != nil {
			return nil, err
		}
		if resp == nil {
			return struct{}{}, nil
		}
		return resp, nil
	}
}

func errOnly[Req any](fn func(context.Context, *Req) error) call {
	return func(ctx context.Context, body []byte) (any, error) {
		req, err := decode[Req](body)
		if err != nil {
			return nil, err
		}
		return struct{}{}, fn(ctx, req)
	}
}

func noBody(fn func(context.Context) (any, error)) call {
	return func(ctx context.Context, _ []byte) (any, error) { return fn(ctx) }
}

type errorBody struct {
	Err string
}

func (rt *Router) add(method string, fn call) {
	rt.mux.HandleFunc("/"+method, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		ctx, cancel := context.WithTimeout(r.Context(), CallTimeout)
		defer cancel()
		res, err := rt.run(ctx, method, r, fn)
		took := time.Since(start)
		if rt.observe != nil {
			rt.observe(method, took, err)
		}
		if err != nil {
			status := http.StatusInternalServerError
			if errors.Is(err, errBadRequest) {
				status = http.StatusBadRequest
			}
			rt.log.Warn("plugin call failed", "method", method, "took", took, "err", err)
			writeJSON(w, status, errorBody{Err: err.Error()})
			return
		}
		rt.log.Debug("plugin call", "method", method, "took", took)
		writeJSON(w, http.StatusOK, res)
	})
}

func (rt *Router) run(ctx context.Context, method string, r *http.Request, fn call) (res any, err error) {
	defer func() {
		if p := recover(); p != nil {
			rt.log.Error("plugin call panicked", "method", method, "panic", p, "stack", string(debug.Stack()))
			res, err = nil, fmt.Errorf("internal error in %s: %v", method, p)
		}
	}()
	if r.Method != http.MethodPost {
		return nil, fmt.Errorf("%w: %s wants POST, got %s", errBadRequest, method, r.Method)
	}
	if rt.refused != nil && !handshake[method] {
		if err := rt.refused(); err != nil {
			return nil, err
		}
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, MaxBody))
	if err != nil {
		return nil, fmt.Errorf("%w: reading the body of %s: %v", errBadRequest, method, err)
	}
	// dockerd names the method in front of the error itself.
	return fn(ctx, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", ContentType)
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
