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
// calls fail with store.ErrUnavailable until it answers.
func Open(ctx context.Context, cfg store.Config) (store.Store, error) {
	loc, err := store.ParseURL(cfg.URL)
	if err != nil {
		return nil, err
	}
	switch loc.Scheme {
	case "bolt":
		return bolt.Open(ctx, cfg)
	case "etcd":
		return etcd.Open(ctx, cfg)
	case "consul":
		return consul.Open(ctx, cfg)
	default: // zk; ParseURL allows no other
		return zk.Open(ctx, cfg)
	}
}
