// Package stores opens a store by URL: bolt, etcd, consul or zk.
package stores

import (
	"context"

	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/bolt"
	"github.com/dnplabs/docker-net-plugin/store/consul"
	"github.com/dnplabs/docker-net-plugin/store/etcd"
	"github.com/dnplabs/docker-net-plugin/store/zk"
)

// Open returns the store cfg.URL names. It does not wait for a server:
// calls fail with store.ErrUnavailable until it answers. Calls to etcd,
// Consul and ZooKeeper ride through a failover of the cluster (see
// store.WithFailover).
func Open(ctx context.Context, cfg store.Config) (store.Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	var open func(context.Context, store.Config) (store.Store, error)
	switch loc.Scheme {
	case "bolt":
		return bolt.Open(ctx, cfg)
	case "etcd":
		open = etcd.Open
	case "consul":
		open = consul.Open
	default: // zk; ParseURL allows no other
		open = zk.Open
	}
	s, err := open(ctx, cfg)
	if err != nil {
		return nil, err
	}
	// Clusters elect a new leader when theirs dies: calls wait for it.
	return store.WithFailover(s), nil
}
