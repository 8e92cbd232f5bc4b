package dockerhosts

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// EngineEnv names the environment variable that picks the Docker engine the
// harness runs: "20.10" (Debian 12's docker.io), "26.1" (trixie's) or
// "28.5" (sid's). `make test DOCKER=...` sets it.
const EngineEnv = "DNP_DOCKER"

// DefaultEngine is the engine used when EngineEnv is empty.
const DefaultEngine = "20.10"

// EnginesDir is where scripts/install-docker-engines.sh unpacks the newer
// engines, one directory per version with a bin/ of dockerd, containerd,
// its shim, docker-proxy, the docker CLI and (28.5) docker-compose.
const EnginesDir = "/opt/dnp/docker"

// Engine is one Docker engine: the daemon and the CLI that matches it.
type Engine struct {
	Version string // "20.10", "26.1" or "28.5"
	Dockerd string // path of dockerd
	Docker  string // path of the docker CLI of the same version
	// BinDir, when set, goes first on dockerd's PATH, so that it starts
	// its own containerd, shim and docker-proxy (runc stays the system's).
	BinDir string
	// Compose is the docker-compose CLI plugin, "" when the engine has none.
	Compose string
}

// Engines are the engine versions this package knows, newest first.
var Engines = []string{"28.5", "26.1", "20.10"}

// NewestEngine returns the newest of Engines that is installed.
func NewestEngine() (Engine, error) {
	var errs []string
	for _, v := range Engines {
		e, err := EngineVersion(v)
		if err == nil {
			return e, nil
		}
		errs = append(errs, err.Error())
	}
	return Engine{}, fmt.Errorf("no docker engine installed: %s", strings.Join(errs, "; "))
}

// CurrentEngine returns the engine EngineEnv picks, or an error that says
// what is missing and how to get it.
func CurrentEngine() (Engine, error) {
	v := strings.TrimSpace(os.Getenv(EngineEnv))
	if v == "" {
		v = DefaultEngine
	}
	return EngineVersion(v)
}

// EngineVersion returns engine v, if it is installed.
func EngineVersion(v string) (Engine, error) {
	if v == "20.10" {
		e := Engine{Version: v, Dockerd: "/usr/sbin/dockerd", Docker: "/usr/bin/docker"}
		for _, p := range []string{e.Dockerd, e.Docker} {
			if !executable(p) {
				return e, fmt.Errorf("docker engine 20.10: %s missing (apt-get install docker.io, or make deps)", p)
			}
		}
		return e, nil
	}
	bin := filepath.Join(EnginesDir, v, "bin")
	e := Engine{Version: v, Dockerd: filepath.Join(bin, "dockerd"), Docker: filepath.Join(bin, "docker"), BinDir: bin}
	for _, p := range []string{e.Dockerd, e.Docker, filepath.Join(bin, "containerd")} {
		if !executable(p) {
			return e, fmt.Errorf("docker engine %s: %s missing (want one of 20.10, 26.1, 28.5; scripts/install-docker-engines.sh unpacks 26.1 and 28.5)", v, p)
		}
	}
	if c := filepath.Join(bin, "docker-compose"); executable(c) {
		e.Compose = c
	}
	return e, nil
}

// Env is the environment for this engine's dockerd and CLI: base with the
// engine's bin directory first on PATH.
func (e Engine) Env(base []string) []string {
	if e.BinDir == "" {
		return base
	}
	out := make([]string, 0, len(base)+1)
	path := "PATH=" + e.BinDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, kv := range base {
		if strings.HasPrefix(kv, "PATH=") {
			path = "PATH=" + e.BinDir + ":" + strings.TrimPrefix(kv, "PATH=")
			continue
		}
		out = append(out, kv)
	}
	return append(out, path)
}

func executable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}
