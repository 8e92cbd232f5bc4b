// Package dockerrun runs the encryption data path of the managed plugin
// as a Docker container of its own, so that it outlives the plugin.
//
// dockerd runs a managed plugin as a container whose processes all end
// with it: a crash (kill -9), docker plugin disable, set, upgrade or
// enable would take the data path down with the plugin, and encrypted
// overlays would carry nothing until it is back. So the plugin asks dockerd
// (through the socket of its "dockersock" mount) for a container of the
// data path's own, next to it:
//
//   - from an image of the plugin's own binary, which the plugin imports
//     itself (no registry): docker-net-plugin-crypt:<hash of the binary>;
//   - in the host's network namespace, with CAP_NET_ADMIN, CAP_SYS_ADMIN
//     (to enter the crypt namespace), CAP_SYS_NICE and /dev/net/tun, and
//     nothing else;
//   - with the host directories of the plugin's own mounts that hold what
//     the data path uses (state: its socket, saved state, the host key and
//     the crypt namespace; config: the pre-shared secret), at the same
//     paths as in the plugin;
//   - restarted by dockerd if it fails (restart policy on-failure).
//
// The plugin keeps a container whose settings (image, configuration,
// keys) are those it wants, and replaces one whose are not by a new one
// that takes over from it without losing a packet (crypt.Config.Takeover).
// It removes its containers, and the images no container uses, once no
// encrypted overlay is left.
package dockerrun

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
)

const (
	// imageRepo is the repository of the data path's images.
	imageRepo = "docker-net-plugin-crypt"
	// Labels: a container's instance (Runner.instance), a container's
	// spec (what it runs), and the mark of the data path's images.
	labelInstance = "org.dnplabs.docker-net-plugin.crypt"
	labelSpec     = "org.dnplabs.docker-net-plugin.crypt.spec"
	labelImage    = "org.dnplabs.docker-net-plugin.crypt.image"
	// binary is where the image has the program.
	binary = "/docker-net-plugin"
)

// Runner runs the data path of one plugin in a container (it implements
// overlay.Runner).
type Runner struct {
	api      *api
	pluginID string
	instance string
	log      *slog.Logger

	mu     sync.Mutex // one Run or Tidy at a time
	mounts []pluginMount
	image  string // the image of this binary, once made
}

// New returns a Runner for the managed plugin this process runs in, which
// asks dockerd at host (unix:///path). instance names the containers
// (<instance>-<spec>) and must be unique among the plugins of the host,
// for example the plugin's namespace prefix + "crypt". It fails if this
// process is not a managed plugin.
func New(host, instance string, log *slog.Logger) (*Runner, error) {
	id, err := PluginID()
	if err != nil {
		return nil, err
	}
	a, err := newAPI(host)
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &Runner{api: a, pluginID: id, instance: instance, log: log}, nil
}

// pluginsDir is where dockerd binds a managed plugin's own directory of
// its host's /run/docker/plugins/<plugin id>, which holds its socket.
const pluginsDir = "/run/docker/plugins"

// PluginID returns the ID of the managed plugin this process runs in,
// from its mount table: dockerd binds the plugin's socket directory,
// <plugins dir>/<plugin id> on the host, at /run/docker/plugins.
func PluginID() (string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	return pluginIDFrom(b)
}

func pluginIDFrom(mountinfo []byte) (string, error) {
	id := ""
	sc := bufio.NewScanner(bytes.NewReader(mountinfo))
	for sc.Scan() {
		// id parent major:minor root mount-point options ...
		f := strings.Fields(sc.Text())
		if len(f) < 5 || f[4] != pluginsDir {
			continue
		}
		if base := filepath.Base(f[3]); isPluginID(base) {
			id = base // the last one is on top
		}
	}
	if id == "" {
		return "", errors.New("not a managed plugin: no plugin directory mounted at " + pluginsDir)
	}
	return id, nil
}

func isPluginID(s string) bool {
	if len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil
}

// pluginMount is a mount of the plugin (docker plugin inspect: Settings.Mounts).
type pluginMount struct {
	Name        string
	Source      string
	Destination string
	Type        string
	Options     []string
}

// pluginMounts returns the plugin's mounts, asked once.
func (r *Runner) pluginMounts(ctx context.Context) ([]pluginMount, error) {
	if r.mounts != nil {
		return r.mounts, nil
	}
	var p struct {
		Settings struct{ Mounts []pluginMount }
	}
	if err := r.api.call(ctx, http.MethodGet, "/plugins/"+r.pluginID+"/json", nil, nil, &p); err != nil {
		return nil, fmt.Errorf("this plugin's mounts: %w", err)
	}
	r.mounts = p.Settings.Mounts
	if r.mounts == nil {
		r.mounts = []pluginMount{}
	}
	return r.mounts, nil
}

// dockerMount is a mount of a container (HostConfig.Mounts).
type dockerMount struct {
	Type        string
	Source      string
	Target      string
	ReadOnly    bool         `json:",omitempty"`
	BindOptions *bindOptions `json:",omitempty"`
}

type bindOptions struct {
	Propagation string `json:",omitempty"`
}

// binds are the plugin's mounts that hold the paths of cfg, as mounts of
// the container, at the same place. Mounts with shared propagation (the
// state mount) become slaves in the container: namespaces the plugin
// unbinds there later are gone in the container too.
func binds(mounts []pluginMount, cfg crypt.Config) ([]dockerMount, error) {
	if cfg.HostNetNS != "" {
		return nil, fmt.Errorf("the data path container runs in the host's network namespace, not %s", cfg.HostNetNS)
	}
	paths := []string{filepath.Dir(cfg.Control), filepath.Dir(cfg.StateFile), cfg.KeyFile, cfg.CryptNetNS}
	if cfg.PSKFile != "" {
		paths = append(paths, cfg.PSKFile)
	}
	var out []dockerMount
	for _, p := range paths {
		var best *pluginMount
		for i, m := range mounts {
			if m.Type != "bind" || m.Source == "" || !within(p, m.Destination) {
				continue
			}
			if best == nil || len(m.Destination) > len(best.Destination) {
				best = &mounts[i]
			}
		}
		if best == nil {
			return nil, fmt.Errorf("%s is not in a mount of the plugin from the host (config.json mounts): the data path cannot run outside the plugin", p)
		}
		if slices.ContainsFunc(out, func(d dockerMount) bool { return d.Target == best.Destination }) {
			continue
		}
		d := dockerMount{Type: "bind", Source: best.Source, Target: best.Destination, ReadOnly: slices.Contains(best.Options, "ro")}
		for _, o := range best.Options {
			if o == "rshared" || o == "shared" || o == "rslave" || o == "slave" {
				d.BindOptions = &bindOptions{Propagation: "rslave"}
			}
		}
		out = append(out, d)
	}
	return out, nil
}

// within reports whether path is dir or below it.
func within(path, dir string) bool {
	path, dir = filepath.Clean(path), filepath.Clean(dir)
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// container is an entry of the container list.
type container struct {
	ID     string `json:"Id"`
	Names  []string
	State  string
	Labels map[string]string
}

// containers lists this Runner's containers, running or not.
func (r *Runner) containers(ctx context.Context) ([]container, error) {
	q := labelFilter(labelInstance + "=" + r.instance)
	q.Set("all", "1")
	var list []container
	if err := r.api.call(ctx, http.MethodGet, "/containers/json", q, nil, &list); err != nil {
		return nil, err
	}
	return list, nil
}

func (r *Runner) remove(ctx context.Context, id string) error {
	err := r.api.call(ctx, http.MethodDelete, "/containers/"+id, url.Values{"force": {"1"}}, nil, nil)
	if isStatus(err, http.StatusNotFound) {
		return nil
	}
	return err
}

// Run makes sure the data path with cfg runs in a container of this
// Runner and answers on cfg.Control; see the package documentation.
func (r *Runner) Run(ctx context.Context, cfg crypt.Config) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	mounts, err := r.pluginMounts(ctx)
	if err != nil {
		return err
	}
	mnts, err := binds(mounts, cfg)
	if err != nil {
		return err
	}
	image, err := r.ensureImage(ctx)
	if err != nil {
		return err
	}
	spec, err := specOf(image, cfg)
	if err != nil {
		return err
	}
	cfg.Tag, cfg.Takeover = spec, true
	name := r.instance + "-" + spec

	list, err := r.containers(ctx)
	if err != nil {
		return err
	}
	keep := ""
	for _, c := range list {
		if c.Labels[labelSpec] == spec && c.State == "running" {
			keep = c.ID
		}
	}
	if keep != "" && !answers(ctx, cfg.Control, spec, 5*time.Second) {
		r.log.Warn("the encryption data path container does not answer; replacing it", "container", name)
		keep = ""
	}
	if keep == "" {
		for _, c := range list {
			if slices.Contains(c.Names, "/"+name) {
				if err := r.remove(ctx, c.ID); err != nil {
					return err
				}
			}
		}
		if keep, err = r.create(ctx, name, image, spec, cfg, mnts); err != nil {
			return err
		}
		if !answers(ctx, cfg.Control, spec, 30*time.Second) {
			logs := r.logs(ctx, keep)
			r.remove(ctx, keep)
			return fmt.Errorf("the encryption data path container %s did not answer within 30s; its log:\n%s", name, logs)
		}
		r.log.Info("encryption data path runs in a container of its own", "container", name, "image", image)
	}
	for _, c := range list {
		if c.ID != keep {
			if err := r.remove(ctx, c.ID); err != nil {
				r.log.Warn("removing an old encryption data path container", "container", c.Names, "err", err)
			}
		}
	}
	r.removeImages(ctx, image)
	return nil
}

// create creates and starts the container.
func (r *Runner) create(ctx context.Context, name, image, spec string, cfg crypt.Config, mnts []dockerMount) (string, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	body := map[string]any{
		"Image":      image,
		"Entrypoint": []string{binary, "crypt"},
		"Env":        []string{crypt.ConfigEnv + "=" + string(b)},
		"Labels":     map[string]string{labelInstance: r.instance, labelSpec: spec},
		"HostConfig": map[string]any{
			"NetworkMode": "host",
			"CapDrop":     []string{"ALL"},
			"CapAdd":      []string{"NET_ADMIN", "SYS_ADMIN", "SYS_NICE"},
			"Devices": []map[string]string{
				{"PathOnHost": "/dev/net/tun", "PathInContainer": "/dev/net/tun", "CgroupPermissions": "rwm"},
			},
			"Mounts":        mnts,
			"RestartPolicy": map[string]string{"Name": "on-failure"},
		},
	}
	var created struct {
		ID string `json:"Id"`
	}
	if err := r.api.call(ctx, http.MethodPost, "/containers/create", url.Values{"name": {name}}, body, &created); err != nil {
		return "", fmt.Errorf("create the encryption data path container: %w", err)
	}
	if err := r.api.call(ctx, http.MethodPost, "/containers/"+created.ID+"/start", nil, nil, nil); err != nil {
		r.remove(ctx, created.ID)
		return "", fmt.Errorf("start the encryption data path container: %w", err)
	}
	return created.ID, nil
}

// logs returns the end of a container's log, for an error message.
func (r *Runner) logs(ctx context.Context, id string) string {
	var buf bytes.Buffer
	q := url.Values{"stdout": {"1"}, "stderr": {"1"}, "tail": {"20"}}
	if err := r.api.call(ctx, http.MethodGet, "/containers/"+id+"/logs", q, nil, &buf); err != nil {
		return err.Error()
	}
	// The stream is multiplexed: 8-byte frame headers before each chunk.
	var out strings.Builder
	b := buf.Bytes()
	for len(b) >= 8 {
		n := int(b[4])<<24 | int(b[5])<<16 | int(b[6])<<8 | int(b[7])
		if n > len(b)-8 {
			break
		}
		out.Write(b[8 : 8+n])
		b = b[8+n:]
	}
	return out.String()
}

// answers waits until the data path at control answers with tag.
func answers(ctx context.Context, control, tag string, timeout time.Duration) bool {
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline) && ctx.Err() == nil; time.Sleep(50 * time.Millisecond) {
		c, err := crypt.Dial(control)
		if err != nil {
			continue
		}
		st, err := c.Status()
		c.Close()
		if err == nil && st.Tag == tag {
			return true
		}
	}
	return false
}

// specOf sums up what a data path container runs: the image, the
// configuration, and the keys it reads from files (which can change under
// the same paths).
func specOf(image string, cfg crypt.Config) (string, error) {
	priv, err := crypt.LoadOrCreateKey(cfg.KeyFile)
	if err != nil {
		return "", err
	}
	psk, err := crypt.LoadPSK(cfg.PSKFile)
	if err != nil {
		return "", err
	}
	cfg.Tag, cfg.Takeover = "", false
	h := sha256.New()
	json.NewEncoder(h).Encode(struct {
		Image     string
		Config    crypt.Config
		PublicKey string
		PSK       string
	}{image, cfg, crypt.EncodePublic(priv.PublicKey()), crypt.PSKID(psk)})
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// ensureImage makes the image of this program, unless dockerd has it.
func (r *Runner) ensureImage(ctx context.Context) (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", err
	}
	if r.image == "" {
		sum, err := fileSum(exe)
		if err != nil {
			return "", err
		}
		r.image = imageRepo + ":" + sum[:12]
	}
	err = r.api.call(ctx, http.MethodGet, "/images/"+r.image+"/json", nil, nil, nil)
	if err == nil {
		return r.image, nil
	}
	if !isStatus(err, http.StatusNotFound) {
		return "", err
	}
	start := time.Now()
	if err := r.importImage(ctx, exe, r.image); err != nil {
		return "", err
	}
	r.log.Info("imported the image of the encryption data path", "image", r.image, "took", time.Since(start).Round(time.Millisecond))
	return r.image, nil
}

func fileSum(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// importImage imports an image holding only exe, as /docker-net-plugin
// (docker import of a one-file archive).
func (r *Runner) importImage(ctx context.Context, exe, ref string) error {
	f, err := os.Open(exe)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		err := tw.WriteHeader(&tar.Header{Name: strings.TrimPrefix(binary, "/"), Mode: 0o755, Size: fi.Size(), ModTime: fi.ModTime(), Typeflag: tar.TypeReg})
		if err == nil {
			_, err = io.Copy(tw, f)
		}
		if err == nil {
			err = tw.Close()
		}
		pw.CloseWithError(err)
	}()
	repo, tag, _ := strings.Cut(ref, ":")
	q := url.Values{"fromSrc": {"-"}, "repo": {repo}, "tag": {tag}, "changes": {"LABEL " + labelImage + "=1"}}
	var out bytes.Buffer
	err = r.api.call(ctx, http.MethodPost, "/images/create", q, pr, &out)
	pr.CloseWithError(errors.New("import ended"))
	if err != nil {
		return fmt.Errorf("import the encryption data path's image: %w", err)
	}
	// A stream of JSON messages; a failure is one with an error.
	dec := json.NewDecoder(&out)
	for {
		var m struct{ Error string }
		if err := dec.Decode(&m); err != nil {
			break
		}
		if m.Error != "" {
			return fmt.Errorf("import the encryption data path's image: %s", m.Error)
		}
	}
	return nil
}

// removeImages removes the data path's images other than keep that no
// container uses (dockerd refuses to remove the others).
func (r *Runner) removeImages(ctx context.Context, keep string) {
	var list []struct {
		ID       string `json:"Id"`
		RepoTags []string
	}
	if err := r.api.call(ctx, http.MethodGet, "/images/json", labelFilter(labelImage), nil, &list); err != nil {
		r.log.Debug("listing the encryption data path's images", "err", err)
		return
	}
	for _, im := range list {
		if keep != "" && slices.Contains(im.RepoTags, keep) {
			continue
		}
		err := r.api.call(ctx, http.MethodDelete, "/images/"+im.ID, nil, nil, nil)
		switch {
		case err == nil:
			r.log.Info("removed an image of the encryption data path", "image", im.RepoTags)
		case isStatus(err, http.StatusConflict), isStatus(err, http.StatusNotFound):
			// In use (another plugin's data path), or gone already.
		default:
			r.log.Warn("removing an image of the encryption data path", "image", im.RepoTags, "err", err)
		}
	}
}

// Tidy removes this Runner's containers, and the data path's images no
// container uses.
func (r *Runner) Tidy(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	list, err := r.containers(ctx)
	if err != nil {
		return err
	}
	for _, c := range list {
		if err := r.remove(ctx, c.ID); err != nil {
			return err
		}
		r.log.Info("removed the encryption data path container", "container", c.Names)
	}
	r.removeImages(ctx, "")
	return nil
}
