package names

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/dockersock"
)

// dockerEndpoint is what dockerd says about one endpoint of a container.
type dockerEndpoint struct {
	Container string   // container id
	Name      string   // container name
	Network   string   // the network's name
	Names     []string // container name, aliases and DNS names on that network
	Sandbox   string   // the container's sandbox key
}

// The local dockerd is asked only from the service's own goroutines,
// never from a plugin callback: dockerd holds its locks while it calls
// the plugin, so asking it from there could deadlock.

// dockerAPI is a minimal client of the Docker Engine API over a unix
// socket: the event stream, the list of containers and container inspect,
// at the daemon's own API version.
type dockerAPI struct {
	client *http.Client // for short calls
	stream *http.Client // for the event stream: no overall timeout
	socket string
}

func newDockerAPI(host string) (*dockerAPI, error) {
	tr, path, err := dockersock.Transport(host, 4)
	if err != nil {
		return nil, err
	}
	return &dockerAPI{
		client: &http.Client{Transport: tr, Timeout: 10 * time.Second},
		stream: &http.Client{Transport: tr},
		socket: path,
	}, nil
}

var errNoContainer = errors.New("no such container")

func (d *dockerAPI) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker"+path, nil)
	if err != nil {
		return err
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return fmt.Errorf("dockerd at %s: %w", d.socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return errNoContainer
	}
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("dockerd at %s: GET %s: %s: %s", d.socket, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("dockerd at %s: GET %s: %w", d.socket, path, err)
	}
	return nil
}

// containers lists the ids of the running containers.
func (d *dockerAPI) containers(ctx context.Context) ([]string, error) {
	var list []struct {
		ID string `json:"Id"`
	}
	if err := d.get(ctx, "/containers/json", &list); err != nil {
		return nil, err
	}
	ids := make([]string, 0, len(list))
	for _, c := range list {
		ids = append(ids, c.ID)
	}
	return ids, nil
}

// inspectJSON is the part of a container inspect the name service reads.
type inspectJSON struct {
	ID              string `json:"Id"`
	Name            string
	NetworkSettings struct {
		SandboxKey string
		Networks   map[string]struct {
			EndpointID string
			Aliases    []string
			DNSNames   []string // API 1.44 (Docker 25) and later
		}
	}
}

// inspect returns the container's endpoints by endpoint id.
func (d *dockerAPI) inspect(ctx context.Context, id string) (map[string]dockerEndpoint, error) {
	var c inspectJSON
	if err := d.get(ctx, "/containers/"+url.PathEscape(id)+"/json", &c); err != nil {
		return nil, err
	}
	name := strings.TrimPrefix(c.Name, "/")
	out := map[string]dockerEndpoint{}
	for netName, n := range c.NetworkSettings.Networks {
		if n.EndpointID == "" {
			continue
		}
		out[n.EndpointID] = dockerEndpoint{
			Container: c.ID,
			Name:      name,
			Network:   netName,
			Names:     nameSet([]string{name}, n.Aliases, n.DNSNames),
			Sandbox:   c.NetworkSettings.SandboxKey,
		}
	}
	return out, nil
}

// dockerEvent is one message of the event stream.
type dockerEvent struct {
	Type   string
	Action string
	Actor  struct {
		ID         string
		Attributes map[string]string
	}
}

// events opens the stream of container and network events.
func (d *dockerAPI) events(ctx context.Context) (io.ReadCloser, error) {
	filters := url.QueryEscape(`{"type":["container","network"]}`)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://docker/events?filters="+filters, nil)
	if err != nil {
		return nil, err
	}
	resp, err := d.stream.Do(req)
	if err != nil {
		return nil, fmt.Errorf("dockerd at %s: %w", d.socket, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, fmt.Errorf("dockerd at %s: events: %s", d.socket, resp.Status)
	}
	return resp.Body, nil
}

// watchDocker keeps s.docker following dockerd: a full read of the
// running containers, then the event stream; again after any break.
func (s *Service) watchDocker(ctx context.Context) {
	api, err := newDockerAPI(s.cfg.Docker)
	if err != nil {
		s.log.Error("names of this host's containers are not published", "err", err)
		return
	}
	warned := false
	for wait := 100 * time.Millisecond; ctx.Err() == nil; wait = min(2*wait, 5*time.Second) {
		synced, err := s.followDocker(ctx, api)
		if ctx.Err() != nil {
			return
		}
		if synced {
			wait = 100 * time.Millisecond
		}
		if !warned {
			s.log.Warn("cannot follow dockerd; names of this host's new containers are not published until it answers", "err", err)
			warned = true
		} else {
			s.log.Debug("cannot follow dockerd yet", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		if synced {
			warned = false
		}
	}
}

// followDocker reads every running container, then follows the events
// until the stream breaks. synced says whether the full read succeeded.
func (s *Service) followDocker(ctx context.Context, api *dockerAPI) (synced bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	body, err := api.events(ctx) // first, so no change between the read and the stream is missed
	if err != nil {
		return false, err
	}
	defer body.Close()

	ids, err := api.containers(ctx)
	if err != nil {
		return false, err
	}
	view := map[string]dockerEndpoint{}
	for _, id := range ids {
		eps, err := api.inspect(ctx, id)
		if errors.Is(err, errNoContainer) {
			continue
		}
		if err != nil {
			return false, err
		}
		for epID, e := range eps {
			view[epID] = e
		}
	}
	s.mu.Lock()
	s.docker = view
	s.mu.Unlock()
	s.kick()
	s.log.Info("following dockerd", "socket", api.socket, "containers", len(ids))

	// A reader feeds container ids to one inspecting goroutine; a burst
	// of events for one container becomes one inspect.
	var (
		mu      sync.Mutex
		pending = map[string]bool{}
		wake    = make(chan struct{}, 1)
	)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-wake:
			}
			mu.Lock()
			batch := pending
			pending = map[string]bool{}
			mu.Unlock()
			for id, gone := range batch {
				s.refreshContainer(ctx, api, id, gone)
			}
		}
	}()
	dec := json.NewDecoder(body)
	for {
		var ev dockerEvent
		if err := dec.Decode(&ev); err != nil {
			return true, fmt.Errorf("dockerd event stream: %w", err)
		}
		id, gone := "", false
		switch {
		case ev.Type == "network" && (ev.Action == "connect" || ev.Action == "disconnect"):
			id = ev.Actor.Attributes["container"]
		case ev.Type == "container" && (ev.Action == "start" || ev.Action == "rename"):
			id = ev.Actor.ID
		case ev.Type == "container" && ev.Action == "destroy":
			id, gone = ev.Actor.ID, true
		}
		if id == "" {
			continue
		}
		mu.Lock()
		pending[id] = pending[id] || gone
		mu.Unlock()
		select {
		case wake <- struct{}{}:
		default:
		}
	}
}

// refreshContainer replaces what s.docker holds about one container.
func (s *Service) refreshContainer(ctx context.Context, api *dockerAPI, id string, gone bool) {
	var eps map[string]dockerEndpoint
	if !gone {
		var err error
		eps, err = api.inspect(ctx, id)
		if err != nil && !errors.Is(err, errNoContainer) {
			s.log.Warn("cannot inspect container", "container", short(id), "err", err)
			return
		}
	}
	s.mu.Lock()
	for epID, e := range s.docker {
		if e.Container == id {
			delete(s.docker, epID)
		}
	}
	for epID, e := range eps {
		s.docker[epID] = e
	}
	s.mu.Unlock()
	s.kick()
}
