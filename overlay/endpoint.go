package overlay

import (
	"bytes"
	"errors"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Endpoint is a local endpoint (a container's interface) on a network.
type Endpoint struct {
	ID  string           // endpoint id; names the veths ([A-Za-z0-9_.-])
	MAC net.HardwareAddr // the container's MAC, set on the host end of the veth
}

// HostIfName is the name of the endpoint's veth end in the host namespace,
// the one libnetwork moves into the container (the driver's SrcName).
func HostIfName(endpointID string) string { return "dnp" + short(endpointID) + "-h" }

// portName is the name of the endpoint's veth end in the overlay namespace,
// a port of the bridge. Its alias is the full endpoint id.
func portName(endpointID string) string { return "dnp" + short(endpointID) + "-p" }

func short(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}

// AddEndpoint makes the endpoint's veth pair: one end a bridge port in the
// overlay namespace, the other in the host namespace with the endpoint's MAC
// and the network's MTU. It returns the host end's name. It is idempotent:
// an existing pair is checked and fixed, also after the host end has been
// moved into a container.
func (n *Network) AddEndpoint(ep Endpoint) (string, error) {
	if err := validName("endpoint id", ep.ID); err != nil {
		return "", err
	}
	if len(ep.MAC) != 6 || ep.MAC[0]&1 != 0 {
		return "", fmt.Errorf("endpoint %s: invalid MAC %q (want 6-byte unicast)", ep.ID, ep.MAC)
	}
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if err != nil {
		return "", err
	}
	defer s.close()
	if err := n.addEndpoint(s, ep); err != nil {
		return "", fmt.Errorf("network %s: endpoint %s: %w", n.ID, ep.ID, err)
	}
	return HostIfName(ep.ID), nil
}

func (n *Network) addEndpoint(s *handles, ep Endpoint) error {
	hostName, pName := HostIfName(ep.ID), portName(ep.ID)
	br, err := s.ov.LinkByName(BridgeDevice)
	if err != nil {
		return fmt.Errorf("find %s (run EnsureNetwork): %w", BridgeDevice, err)
	}
	hostEnd, err := s.host.LinkByName(hostName)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("find %s: %w", hostName, err)
	}
	port, err := s.ov.LinkByName(pName)
	if err != nil && !isNotFound(err) {
		return fmt.Errorf("find %s: %w", pName, err)
	}

	if port != nil {
		if alias := port.Attrs().Alias; alias != "" && alias != ep.ID {
			return fmt.Errorf("interface %s belongs to endpoint %s (ids share their first 8 characters)", pName, alias)
		}
	} else {
		if hostEnd != nil {
			return fmt.Errorf("host interface %s already exists and is not this endpoint's", hostName)
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: n.MTU, HardwareAddr: ep.MAC},
			PeerName:      pName,
			PeerNamespace: netlink.NsFd(s.ovNS),
		}
		if err := s.host.LinkAdd(veth); err != nil {
			return fmt.Errorf("create veth %s/%s: %w", hostName, pName, err)
		}
		if port, err = s.ov.LinkByName(pName); err != nil {
			return fmt.Errorf("find new %s: %w", pName, err)
		}
		if hostEnd, err = s.host.LinkByName(hostName); err != nil {
			return fmt.Errorf("find new %s: %w", hostName, err)
		}
	}

	// The bridge port.
	if port.Attrs().Alias != ep.ID {
		if err := s.ov.LinkSetAlias(port, ep.ID); err != nil {
			return fmt.Errorf("set alias of %s: %w", pName, err)
		}
	}
	if port.Attrs().MTU != n.MTU {
		if err := s.ov.LinkSetMTU(port, n.MTU); err != nil {
			return fmt.Errorf("set %s MTU %d: %w", pName, n.MTU, err)
		}
	}
	if port.Attrs().MasterIndex != br.Attrs().Index {
		if err := s.ov.LinkSetMaster(port, br); err != nil {
			return fmt.Errorf("attach %s to %s: %w", pName, BridgeDevice, err)
		}
	}
	if err := setUp(s.ov, pName); err != nil {
		return err
	}

	// The host end, unless libnetwork has already moved it into the
	// container. A veth's parent index is its peer's index.
	if hostEnd == nil {
		return nil
	}
	if hostEnd.Attrs().Index != port.Attrs().ParentIndex || hostEnd.Attrs().ParentIndex != port.Attrs().Index {
		return fmt.Errorf("host interface %s exists but is not the peer of %s", hostName, pName)
	}
	if !bytes.Equal(hostEnd.Attrs().HardwareAddr, ep.MAC) {
		if err := s.host.LinkSetHardwareAddr(hostEnd, ep.MAC); err != nil {
			return fmt.Errorf("set %s MAC %s: %w", hostName, ep.MAC, err)
		}
	}
	if hostEnd.Attrs().MTU != n.MTU {
		if err := s.host.LinkSetMTU(hostEnd, n.MTU); err != nil {
			return fmt.Errorf("set %s MTU %d: %w", hostName, n.MTU, err)
		}
	}
	return nil
}

// RemoveEndpoint deletes the endpoint's veth pair, wherever its host end
// is by now. A missing endpoint (or network) is not an error.
func (n *Network) RemoveEndpoint(id string) error {
	return n.withPort(id, func(s *handles, port netlink.Link) error {
		if err := s.ov.LinkDel(port); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("delete %s: %w", port.Attrs().Name, err)
		}
		return nil
	})
}

// DisableEndpoint takes the endpoint's bridge port down: the bridge no
// longer forwards to or from it, and the container's interface loses its
// carrier. A missing endpoint is not an error.
func (n *Network) DisableEndpoint(id string) error {
	return n.withPort(id, func(s *handles, port netlink.Link) error {
		if port.Attrs().Flags&net.FlagUp == 0 {
			return nil
		}
		if err := s.ov.LinkSetDown(port); err != nil {
			return fmt.Errorf("take %s down: %w", port.Attrs().Name, err)
		}
		return nil
	})
}

// withPort runs fn with the endpoint's bridge port in the overlay
// namespace, under the host's lock. A missing network or port is not an
// error: fn does not run. fn's errors are given the network and endpoint.
func (n *Network) withPort(id string, fn func(s *handles, port netlink.Link) error) error {
	if err := validName("endpoint id", id); err != nil {
		return err
	}
	h := n.host
	h.mu.Lock()
	defer h.mu.Unlock()
	s, err := h.open(n.ID)
	if errors.Is(err, ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	defer s.close()
	pName := portName(id)
	port, err := s.ov.LinkByName(pName)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("network %s: endpoint %s: find %s: %w", n.ID, id, pName, err)
	}
	if alias := port.Attrs().Alias; alias != "" && alias != id {
		return fmt.Errorf("network %s: endpoint %s: interface %s belongs to endpoint %s", n.ID, id, pName, alias)
	}
	if err := fn(s, port); err != nil {
		return fmt.Errorf("network %s: endpoint %s: %w", n.ID, id, err)
	}
	return nil
}
