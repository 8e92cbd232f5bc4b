package bolt_test

import (
	"context"
	"testing"

	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/bolt"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
)

func TestMain(m *testing.M) { storetest.Main(m, open) }

func open(ctx context.Context, cfg store.Config) (store.Store, error) { return bolt.Open(ctx, cfg) }

func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.NewBackend("bolt", open, storetest.Files(t.TempDir())))
}
