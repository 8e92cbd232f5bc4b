package store

import (
	"fmt"
	"net/url"
	"os"
	"strings"
)

// Config says which store to open and how to authenticate to it.
type Config struct {
	// URL selects the backend: bolt:///path/state.db, etcd://h1:2379,h2:2379/prefix,
	// consul://h:8500/prefix, zk://h1:2181,h2:2181/prefix.
	URL string
	// TLS files for etcd and Consul (https is used when CA or Cert is set).
	CAFile, CertFile, KeyFile string
	// Token is Consul's ACL token.
	Token string
	// Username and Password: ZooKeeper digest auth, etcd user auth.
	Username, Password string
}

// DefaultURL is the embedded store used when none is given.
const DefaultURL = "bolt:///var/lib/docker-net-plugin/state.db"

// FromEnv fills what is empty in c from the usual environment variables:
// DNP_STORE, DNP_STORE_CA/CERT/KEY, DNP_STORE_TOKEN or CONSUL_HTTP_TOKEN,
// DNP_STORE_USERNAME/PASSWORD, and ETCDCTL_CACERT/CERT/KEY.
func (c Config) FromEnv() Config {
	set := func(dst *string, names ...string) {
		for _, n := range names {
			if *dst == "" {
				*dst = os.Getenv(n)
			}
		}
	}
	set(&c.URL, "DNP_STORE")
	set(&c.CAFile, "DNP_STORE_CA", "ETCDCTL_CACERT", "CONSUL_CACERT")
	set(&c.CertFile, "DNP_STORE_CERT", "ETCDCTL_CERT", "CONSUL_CLIENT_CERT")
	set(&c.KeyFile, "DNP_STORE_KEY", "ETCDCTL_KEY", "CONSUL_CLIENT_KEY")
	set(&c.Token, "DNP_STORE_TOKEN", "CONSUL_HTTP_TOKEN")
	set(&c.Username, "DNP_STORE_USERNAME")
	set(&c.Password, "DNP_STORE_PASSWORD")
	if c.URL == "" {
		c.URL = DefaultURL
	}
	return c
}

// Location is a parsed store URL.
type Location struct {
	Scheme string
	Hosts  []string // host:port, in order
	Prefix string   // without leading or trailing slash; may be empty
	Path   string   // the file path, for bolt
}

// ParseURL splits a store URL into its parts and checks them.
func ParseURL(raw string) (Location, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Location{}, fmt.Errorf("%w: store URL %q: %v", ErrInvalid, raw, err)
	}
	loc := Location{Scheme: u.Scheme}
	switch u.Scheme {
	case "bolt":
		if u.Host != "" || u.Path == "" {
			return Location{}, fmt.Errorf("%w: store URL %q: want bolt:///absolute/path/file.db", ErrInvalid, raw)
		}
		loc.Path = u.Path
		return loc, nil
	case "etcd", "consul", "zk":
	default:
		return Location{}, fmt.Errorf("%w: store URL %q: unknown scheme %q (want bolt, etcd, consul or zk)", ErrInvalid, raw, u.Scheme)
	}
	if u.Host == "" {
		return Location{}, fmt.Errorf("%w: store URL %q names no server", ErrInvalid, raw)
	}
	for _, h := range strings.Split(u.Host, ",") {
		if h == "" || !strings.Contains(h, ":") {
			return Location{}, fmt.Errorf("%w: store URL %q: server %q needs host:port", ErrInvalid, raw, h)
		}
		loc.Hosts = append(loc.Hosts, h)
	}
	loc.Prefix = strings.Trim(u.Path, "/")
	return loc, nil
}
