package bolt_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/bolt"
	"github.com/dnplabs/docker-net-plugin/store/storetest"
)

func TestMain(m *testing.M) {
	storetest.Main(m, func(ctx context.Context, url string) (store.Store, error) {
		return bolt.Open(ctx, store.Config{URL: url})
	})
}

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	url := func(ns string) string { return "bolt://" + filepath.Join(dir, ns+".db") }
	storetest.Run(t, storetest.Backend{
		Name: "bolt",
		URL:  url,
		Open: func(t testing.TB, ns string) store.Store {
			s, err := bolt.Open(context.Background(), store.Config{URL: url(ns)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			return s
		},
	})
}
