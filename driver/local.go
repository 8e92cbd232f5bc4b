package driver

import "context"

// The driver is the peer sync's localHost.
var _ localHost = (*Driver)(nil)

func (d *Driver) localEndpoints() []*localEndpoint {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]*localEndpoint, 0, len(d.endpoints))
	for _, ep := range d.endpoints {
		out = append(out, ep)
	}
	return out
}

// localVNIs are the VNIs of the overlays this process's local endpoints are on.
func (d *Driver) localVNIs() map[uint32]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	vnis := map[uint32]bool{}
	for _, ep := range d.endpoints {
		if n := d.networks[ep.Network]; n != nil {
			vnis[n.Overlay.VNI] = true
		}
	}
	return vnis
}

func (d *Driver) holdJoins() func() {
	d.planeMu.Lock()
	return d.planeMu.Unlock
}

// lockHost keeps doctor --fix (another process) off this host's overlays.
func (d *Driver) lockHost(ctx context.Context) (func(), error) {
	if d.cfg.HostLock == nil {
		return func() {}, nil
	}
	return d.cfg.HostLock(ctx)
}

func (d *Driver) setKeptLive() { d.keptLive.Store(true) }
