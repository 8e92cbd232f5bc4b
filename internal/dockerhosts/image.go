package dockerhosts

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

var (
	rootfsOnce sync.Once
	rootfsTar  []byte
	rootfsErr  error
)

// importImage loads Image into the host's dockerd with docker import.
func (h *Host) importImage() error {
	rootfsOnce.Do(func() { rootfsTar, rootfsErr = busyboxRootfs() })
	if rootfsErr != nil {
		return fmt.Errorf("build busybox rootfs: %w", rootfsErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := h.docker(ctx, bytes.NewReader(rootfsTar), "import", "--change", `CMD ["/bin/sh"]`, "-", Image)
	if err != nil {
		return fmt.Errorf("import %s: %w", Image, err)
	}
	return nil
}

// McastTool is the path, in Image, of the multicast sender and receiver
// (internal/mcast/dnp-mcast): `dnp-mcast send|recv ... GROUP:PORT`.
const McastTool = "/usr/bin/dnp-mcast"

// busyboxRootfs returns a tar of a minimal root filesystem: the static
// busybox binary with a symlink for every applet at its usual path, the
// multicast test tool (McastTool), plus the directories and files programs
// expect. Built in memory, once per process.
func busyboxRootfs() ([]byte, error) {
	bin, err := exec.LookPath("busybox")
	if err != nil {
		return nil, fmt.Errorf("busybox (package busybox-static): %w", err)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	list, err := run(ctx, exec.CommandContext(ctx, bin, "--list-full"))
	if err != nil {
		return nil, err
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dirs := map[string]bool{}
	addDir := func(name string, mode int64) error {
		if dirs[name] {
			return nil
		}
		dirs[name] = true
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: mode})
	}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "root", "run", "var"} {
		if err := addDir(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := addDir("tmp", 0o1777); err != nil {
		return nil, err
	}
	files := map[string]string{
		"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
		"etc/group":  "root:x:0:\nnogroup:x:65534:\n",
	}
	for name, content := range files {
		if err := writeFile(tw, name, []byte(content), 0o644); err != nil {
			return nil, err
		}
	}
	if err := writeFile(tw, "bin/busybox", data, 0o755); err != nil {
		return nil, err
	}
	mcast, err := BuildMcastTool()
	if err != nil {
		return nil, err
	}
	if err := writeFile(tw, strings.TrimPrefix(McastTool, "/"), mcast, 0o755); err != nil {
		return nil, err
	}
	for _, applet := range strings.Fields(list) {
		if applet == "bin/busybox" {
			continue
		}
		if err := addDir(path.Dir(applet), 0o755); err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeSymlink, Name: applet, Linkname: "/bin/busybox", Mode: 0o777}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func writeFile(tw *tar.Writer, name string, data []byte, mode int64) error {
	hdr := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data))}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err := tw.Write(data)
	return err
}

// McastToolEnv names a prebuilt dnp-mcast binary to use instead of
// building it (the test guest has no Go toolchain on its PATH).
const McastToolEnv = "DNP_MCAST_BIN"

// BuildMcastTool builds internal/mcast/dnp-mcast as a static binary and
// returns it, or reads the one McastToolEnv names.
func BuildMcastTool() ([]byte, error) {
	if prebuilt := os.Getenv(McastToolEnv); prebuilt != "" {
		return os.ReadFile(prebuilt)
	}
	dir, err := os.MkdirTemp("", "dnp-mcast-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	_, here, _, _ := runtime.Caller(0) // internal/dockerhosts/image.go
	src := filepath.Join(filepath.Dir(here), "..", "..", "internal", "mcast", "dnp-mcast")
	bin := filepath.Join(dir, "dnp-mcast")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, ".")
	cmd.Dir = src
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build %s: %v\n%s", src, err, out)
	}
	return os.ReadFile(bin)
}
