package crypt

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"
)

// The control protocol: the plugin tells the data path, over a unix
// socket only root can use, which hosts may carry which VNI and what the
// hosts' public keys are. One JSON request per line, one JSON response per
// line. Every change is incremental and idempotent, so a restarted plugin
// replaying what it knows never disturbs traffic.

type request struct {
	Op    string            `json:"op"`
	VNI   uint32            `json:"vni,omitempty"`
	Hosts []netip.Addr      `json:"hosts,omitempty"`
	Keys  map[string]string `json:"keys,omitempty"` // host address -> EncodePublic
}

type response struct {
	Error  string  `json:"error,omitempty"`
	VNIs   int     `json:"vnis"` // how many VNIs the data path carries after the request
	Status *Status `json:"status,omitempty"`
}

const (
	opAddVNI     = "add-vni"     // carry VNI (members unchanged if known)
	opSetMembers = "set-members" // the hosts that may send and receive VNI
	opRemoveVNI  = "remove-vni"  // stop carrying VNI
	opSetKeys    = "set-keys"    // add or replace hosts' public keys
	opStatus     = "status"
	opStop       = "stop" // exit
	// handoff: the data path replies with its TUN device and UDP socket
	// (SCM_RIGHTS) and refuses changes from then on; the next request
	// on the connection is stop (handoff.go).
	opHandoff = "handoff"
)

// errHandedOff is the error of a change sent to a data path that is
// handing its packets over: the client should connect again (to the one
// taking over).
const errHandedOff = "handing over to a new data path; connect again"

// Status is what the data path reports about itself.
type Status struct {
	PID      int        `json:"pid"`
	Instance string     `json:"instance"`      // random, per process start
	Tag      string     `json:"tag,omitempty"` // Config.Tag
	Local    netip.Addr `json:"local"`
	Port     int        `json:"port"`
	Interval string     `json:"rekey_interval"`
	Epoch    uint32     `json:"epoch"` // now
	PSK      bool       `json:"psk"`
	// PublicKey is this host's public key; PSKID identifies the
	// pre-shared secret (PSKID), "" for none.
	PublicKey string              `json:"public_key"`
	PSKID     string              `json:"psk_id,omitempty"`
	Peers     []PeerStatus        `json:"peers"`
	VNIs      map[uint32][]string `json:"vnis"`
	Counters  map[string]uint64   `json:"counters"`
}

// PeerStatus is one remote host as the data path knows it.
type PeerStatus struct {
	Addr      netip.Addr `json:"addr"`
	PublicKey string     `json:"public_key"`
	// The epochs of the keys most recently used to send to the host and
	// accepted from it, oldest first.
	SentEpochs     []uint32 `json:"sent_epochs"`
	ReceivedEpochs []uint32 `json:"received_epochs"`
}

// Client talks to a running data path.
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	r    *bufio.Reader
}

// callTimeout bounds one request.
const callTimeout = 5 * time.Second

// Dial connects to the data path's control socket.
func Dial(path string) (*Client, error) {
	conn, err := net.DialTimeout("unix", path, callTimeout)
	if err != nil {
		return nil, fmt.Errorf("encryption data path at %s: %w", path, err)
	}
	return &Client{conn: conn, r: bufio.NewReader(conn)}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

func (c *Client) call(req request) (response, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.conn.SetDeadline(time.Now().Add(callTimeout))
	b, _ := json.Marshal(req)
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return response{}, fmt.Errorf("encryption data path: %s: %w", req.Op, err)
	}
	line, err := c.r.ReadBytes('\n')
	if err != nil {
		return response{}, fmt.Errorf("encryption data path: %s: %w", req.Op, err)
	}
	var resp response
	if err := json.Unmarshal(line, &resp); err != nil {
		return resp, fmt.Errorf("encryption data path: %s: bad response: %w", req.Op, err)
	}
	if resp.Error != "" {
		return resp, fmt.Errorf("encryption data path: %s: %s", req.Op, resp.Error)
	}
	return resp, nil
}

// AddVNI makes the data path carry vni; its members stay as they were
// (none for a new VNI: nothing passes until SetMembers).
func (c *Client) AddVNI(vni uint32) error {
	_, err := c.call(request{Op: opAddVNI, VNI: vni})
	return err
}

// SetMembers says which remote hosts may send and receive vni.
func (c *Client) SetMembers(vni uint32, hosts []netip.Addr) error {
	if hosts == nil {
		hosts = []netip.Addr{}
	}
	_, err := c.call(request{Op: opSetMembers, VNI: vni, Hosts: hosts})
	return err
}

// RemoveVNI stops carrying vni and returns how many VNIs are left.
func (c *Client) RemoveVNI(vni uint32) (int, error) {
	resp, err := c.call(request{Op: opRemoveVNI, VNI: vni})
	return resp.VNIs, err
}

// SetKeys adds or replaces the public keys of hosts (EncodePublic form).
func (c *Client) SetKeys(keys map[netip.Addr]string) error {
	m := make(map[string]string, len(keys))
	for a, k := range keys {
		m[a.String()] = k
	}
	_, err := c.call(request{Op: opSetKeys, Keys: m})
	return err
}

// Status reports the data path's state and counters.
func (c *Client) Status() (*Status, error) {
	resp, err := c.call(request{Op: opStatus})
	if err != nil {
		return nil, err
	}
	if resp.Status == nil {
		return nil, errors.New("encryption data path: status: empty response")
	}
	return resp.Status, nil
}

// Stop makes the data path exit.
func (c *Client) Stop() error {
	_, err := c.call(request{Op: opStop})
	return err
}
