package dockerrun

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/dockersock"
)

// api is a minimal client of the Docker Engine API over a unix socket, at
// the daemon's own API version (no version prefix): what the Runner needs
// works alike on Docker 20.10, 26.1 and 28.5.
type api struct {
	client *http.Client
	socket string
}

// callTimeout bounds one call; an image import gets longer.
const callTimeout = 30 * time.Second

func newAPI(host string) (*api, error) {
	tr, path, err := dockersock.Transport(host, 2)
	if err != nil {
		return nil, err
	}
	return &api{client: &http.Client{Transport: tr}, socket: path}, nil
}

// apiError is dockerd's answer to a call that failed.
type apiError struct {
	call    string
	status  int
	message string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("dockerd: %s: %d %s", e.call, e.status, e.message)
}

// isStatus reports whether err is dockerd's answer with that HTTP status.
func isStatus(err error, status int) bool {
	var e *apiError
	return errors.As(err, &e) && e.status == status
}

// call does one request; body, if not nil, is sent as JSON unless it is an
// io.Reader (sent as is, a tar archive). A 2xx answer is decoded into out
// if out is not nil.
func (a *api) call(ctx context.Context, method, path string, query url.Values, body any, out any) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	var rd io.Reader
	ctype := ""
	switch b := body.(type) {
	case nil:
	case io.Reader:
		rd, ctype = b, "application/x-tar"
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return err
		}
		rd, ctype = bytes.NewReader(j), "application/json"
	}
	u := "http://docker" + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	name := method + " " + path
	resp, err := a.client.Do(req)
	if err != nil {
		return fmt.Errorf("dockerd at %s: %s: %w", a.socket, name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		var m struct{ Message string }
		if json.Unmarshal(b, &m) != nil || m.Message == "" {
			m.Message = strings.TrimSpace(string(b))
		}
		return &apiError{call: name, status: resp.StatusCode, message: m.Message}
	}
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	if w, ok := out.(io.Writer); ok {
		_, err := io.Copy(w, resp.Body)
		return err
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("dockerd: %s: %w", name, err)
	}
	return nil
}

// labelFilter is the filters query value that selects by label.
func labelFilter(label string) url.Values {
	f, _ := json.Marshal(map[string][]string{"label": {label}})
	return url.Values{"filters": {string(f)}}
}
