package driver

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strconv"
	"strings"

	"github.com/docker/go-plugins-helpers/network"
)

// Swarm networks. The leading manager calls AllocateNetwork once per
// network: it claims the network's overlay (name and VNI) in the store,
// held by the swarm until FreeNetwork, and returns the overlay's name and
// VNI with the user's options. Swarm hands these options to CreateNetwork
// on every node, which then joins that overlay as a plain host joins its
// network's overlay. Peers are found through the store, as always, not
// through Docker's DiscoverNew node notifications.

// AllocateNetwork claims the overlay of a swarm network and returns the
// options every node's CreateNetwork gets. Called again for the same
// network (a new leader, a restarted manager; the options then carry what
// it returned before), it returns the same overlay.
func (d *Driver) AllocateNetwork(ctx context.Context, r *network.AllocateNetworkRequest) (*network.AllocateNetworkResponse, error) {
	if r.NetworkID == "" {
		return nil, errors.New("AllocateNetwork without a NetworkID")
	}
	if err := validID("network", r.NetworkID); err != nil {
		return nil, err
	}
	user := map[string]string{}
	for k, v := range r.Options {
		if !strings.HasPrefix(k, "com.docker.") {
			user[k] = v
		}
	}
	var data []*network.IPAMData
	for _, list := range [][]network.IPAMData{r.IPv4Data, r.IPv6Data} {
		for i := range list {
			data = append(data, &list[i])
		}
	}
	d.log.Debug("allocate network request", "network", short(r.NetworkID), "ipam", ipamDataString(data), "options", r.Options)
	spec, err := parseSpec(user, data)
	if err != nil {
		return nil, err
	}
	if len(spec.Ranges) > 0 {
		return nil, errSwarmRange
	}
	spec.Swarm = r.NetworkID
	ov, err := allocateOverlay(ctx, d.cfg.Store, spec)
	if err != nil {
		return nil, fmt.Errorf("allocate swarm network %.12s: %w", r.NetworkID, err)
	}
	out := maps.Clone(r.Options)
	if out == nil {
		out = map[string]string{}
	}
	out[OptOverlay] = ov.Name
	out[OptVNI] = strconv.FormatUint(uint64(ov.VNI), 10)
	d.log.Info("swarm network allocated", "network", short(r.NetworkID), "overlay", ov.Name, "vni", ov.VNI, "subnets", ov.Subnets)
	return &network.AllocateNetworkResponse{Options: out}, nil
}

// FreeNetwork drops the swarm's hold on the network's overlay; the overlay
// and its VNI go once no node uses it any more either.
func (d *Driver) FreeNetwork(ctx context.Context, r *network.FreeNetworkRequest) error {
	if r.NetworkID == "" {
		return errors.New("FreeNetwork without a NetworkID")
	}
	kvs, err := d.cfg.Store.List(ctx, overlaysDir)
	if err != nil {
		return fmt.Errorf("free swarm network %.12s: %w", r.NetworkID, err)
	}
	for _, kv := range kvs {
		rec, err := decodeKV[overlayRecord](kv)
		if err != nil || rec.Swarm != r.NetworkID {
			continue
		}
		if err := freeOverlay(ctx, d.cfg.Store, rec.Name); err != nil {
			return fmt.Errorf("free swarm network %.12s: overlay %s: %w", r.NetworkID, rec.Name, err)
		}
		d.log.Info("swarm network freed", "network", short(r.NetworkID), "overlay", rec.Name)
		return nil
	}
	d.log.Info("swarm network freed; it had no overlay left", "network", short(r.NetworkID))
	return nil
}
