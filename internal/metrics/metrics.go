// Package metrics exposes the plugin's Prometheus metrics: plugin calls,
// store operations, watch reconnects and what the driver's reconciliation
// does. Every metric is named dnp_*.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/dnplabs/docker-net-plugin/store"
)

// Metrics holds the collectors of one plugin process. Its methods are safe
// for concurrent use; a nil *Metrics records nothing.
type Metrics struct {
	reg *prometheus.Registry

	calls        *prometheus.CounterVec
	callSeconds  *prometheus.HistogramVec
	storeSeconds *prometheus.HistogramVec
	storeErrors  *prometheus.CounterVec
	reconnects   *prometheus.CounterVec
	endpoints    *prometheus.GaugeVec
	hosts        prometheus.Gauge
	reconciles   *prometheus.CounterVec
	changes      prometheus.Counter
	skipped      *prometheus.GaugeVec
}

// New registers every collector (plus Go runtime and process metrics) in a
// registry of its own.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnp_plugin_calls_total",
			Help: "Plugin API calls from dockerd, by method and result (ok or error).",
		}, []string{"method", "result"}),
		callSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "dnp_plugin_call_duration_seconds",
			Help:    "How long plugin API calls took, by method.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 25},
		}, []string{"method"}),
		storeSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "dnp_store_operation_duration_seconds",
			Help:    "How long store operations took, by operation (get, list, put, delete, cas, txn, watch, register).",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 5},
		}, []string{"op"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnp_store_errors_total",
			Help: "Failed store operations, by operation and kind (not_found and conflict are often expected answers; unavailable, timeout, invalid and other are not).",
		}, []string{"op", "kind"}),
		reconnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnp_store_watch_reconnects_total",
			Help: "Times a store watch lost track and re-read its directory (every reset after the first), by directory.",
		}, []string{"dir"}),
		endpoints: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "dnp_endpoints_known",
			Help: "Endpoints in the store as the driver last saw them, on this host (local) or on others (remote).",
		}, []string{"location"}),
		hosts: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dnp_hosts_known",
			Help: "Live hosts (this one included) as the driver last saw them in the store.",
		}),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dnp_reconcile_runs_total",
			Help: "Passes of the peer sync over this host's kernel (deltas and full reconciliations with the store), by result (ok or error).",
		}, []string{"result"}),
		changes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dnp_reconcile_changes_total",
			Help: "Kernel changes (forwarding and neighbour entries, overlays removed) the reconciliation made.",
		}),
		skipped: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "dnp_endpoint_records_skipped",
			Help: "Endpoint records of other hosts the last reconciliation did not program, by reason: invalid (malformed) or conflict (a MAC or address another endpoint of the overlay holds). Each is logged once; `docker-net-plugin status` lists them.",
		}, []string{"reason"}),
	}
	m.reg.MustRegister(m.calls, m.callSeconds, m.storeSeconds, m.storeErrors, m.reconnects,
		m.endpoints, m.hosts, m.reconciles, m.changes, m.skipped,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Show both results from the start, so that rate() and alerts work
	// before the first error.
	m.reconciles.WithLabelValues("ok")
	m.reconciles.WithLabelValues("error")
	m.skipped.WithLabelValues("invalid")
	m.skipped.WithLabelValues("conflict")
	return m
}

// Registry is where the collectors are registered.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Timeout: 10 * time.Second})
}

// PluginCall records one plugin API call; it has the signature of
// pluginapi.Observer.
func (m *Metrics) PluginCall(method string, took time.Duration, err error) {
	if m == nil {
		return
	}
	m.calls.WithLabelValues(method, result(err)).Inc()
	m.callSeconds.WithLabelValues(method).Observe(took.Seconds())
}

// Reconciled records one reconciliation run (driver.Metrics).
func (m *Metrics) Reconciled(changes int, err error) {
	if m == nil {
		return
	}
	m.reconciles.WithLabelValues(result(err)).Inc()
	m.changes.Add(float64(changes))
}

// Known records the endpoints and live hosts the driver knows (driver.Metrics).
func (m *Metrics) Known(localEndpoints, remoteEndpoints, hosts int) {
	if m == nil {
		return
	}
	m.endpoints.WithLabelValues("local").Set(float64(localEndpoints))
	m.endpoints.WithLabelValues("remote").Set(float64(remoteEndpoints))
	m.hosts.Set(float64(hosts))
}

// Skipped records the endpoint records the driver skips (driver.Metrics).
func (m *Metrics) Skipped(invalid, conflicting int) {
	if m == nil {
		return
	}
	m.skipped.WithLabelValues("invalid").Set(float64(invalid))
	m.skipped.WithLabelValues("conflict").Set(float64(conflicting))
}

func result(err error) string {
	if err != nil {
		return "error"
	}
	return "ok"
}

// errorKind names the kind of a store error for the kind label.
func errorKind(err error) string {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return "not_found"
	case errors.Is(err, store.ErrConflict):
		return "conflict"
	case errors.Is(err, store.ErrUnavailable):
		return "unavailable"
	case errors.Is(err, store.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, store.ErrInvalid):
		return "invalid"
	}
	return "other"
}

// Serve serves /metrics on addr until ctx ends. It returns the address
// it listens on once the listener is open; the server runs in the
// background.
func (m *Metrics) Serve(ctx context.Context, addr string, log *slog.Logger) (net.Addr, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       2 * time.Minute,
	}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "addr", l.Addr().String(), "err", err)
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Info("serving metrics", "url", "http://"+l.Addr().String()+"/metrics")
	return l.Addr(), nil
}
