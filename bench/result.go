// Package bench measures the plugin on the multi-host harness and turns the
// measurements into BENCHMARKS.md and a chart.
//
// The benchmarks are tests in this package (bench_*_test.go) that run only
// with DNP_BENCH=1, as root, on a machine set up by scripts/install-deps.sh.
// Each one writes a Result (JSON) into the directory DNP_BENCH_OUT; the
// report command (go run ./bench/report) reads that directory and writes
// the Markdown file and the PNG chart. `make bench` does both
// (scripts/bench.sh). Nothing in the report is typed in by hand: every
// number comes from a Result file of the same run.
package bench

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"sort"
)

// Result is what one benchmark measured.
type Result struct {
	ID       string `json:"id"`       // file name and anchor: "throughput"
	Order    int    `json:"order"`    // position in the report
	Title    string `json:"title"`    // section heading
	Measures string `json:"measures"` // what is measured, how
	Baseline string `json:"baseline"` // what it is compared with
	RunAlone string `json:"run_alone"`
	// Percentiles adds p99 columns (for benchmarks with many samples).
	Percentiles bool     `json:"percentiles,omitempty"`
	Rows        []Row    `json:"rows"`
	Notes       []string `json:"notes,omitempty"`
	// LoadAvg is /proc/loadavg when the benchmark started: the machine is
	// shared, and busy neighbours show in the numbers.
	LoadAvg  string  `json:"loadavg,omitempty"`
	Seconds  float64 `json:"seconds"` // wall time of the whole benchmark
	Finished string  `json:"finished"`
}

// Row is one measured case next to its baseline.
type Row struct {
	Name    string    `json:"name"`
	Unit    string    `json:"unit"`
	Samples []float64 `json:"samples"`
	// BaseName and Base are the baseline, measured in the same run.
	BaseName string    `json:"base_name,omitempty"`
	Base     []float64 `json:"base,omitempty"`
	// Unavailable, when set, says why the case could not be measured.
	Unavailable string `json:"unavailable,omitempty"`
	// Chart names the chart panel the row is drawn in ("" = none). Rows of
	// one panel share its unit.
	Chart string `json:"chart,omitempty"`
}

// Stats summarises samples.
type Stats struct {
	N                     int
	Median, Min, Max, P99 float64
}

// Summarize computes the statistics of samples (zero Stats when empty).
func Summarize(samples []float64) Stats {
	if len(samples) == 0 {
		return Stats{}
	}
	s := slices.Clone(samples)
	sort.Float64s(s)
	return Stats{N: len(s), Median: Percentile(s, 50), Min: s[0], Max: s[len(s)-1], P99: Percentile(s, 99)}
}

// Percentile returns the p-th percentile of sorted samples, interpolating
// linearly between the two nearest ranks.
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	pos := p / 100 * float64(len(sorted)-1)
	lo := int(math.Floor(pos))
	hi := int(math.Ceil(pos))
	frac := pos - float64(lo)
	return sorted[lo] + (sorted[hi]-sorted[lo])*frac
}

// Ratio is the median of the samples over the median of the baseline. It
// is NaN without a baseline or when either median is not positive (a ratio
// of times measured from a point both can precede means nothing).
func (r Row) Ratio() float64 {
	if len(r.Samples) == 0 || len(r.Base) == 0 {
		return math.NaN()
	}
	a, b := Summarize(r.Samples).Median, Summarize(r.Base).Median
	if a <= 0 || b <= 0 {
		return math.NaN()
	}
	return a / b
}

// Save writes r as <dir>/<r.ID>.json.
func Save(dir string, r Result) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("save result %s: %w", r.ID, err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("save result %s: %w", r.ID, err)
	}
	path := filepath.Join(dir, r.ID+".json")
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("save result %s: %w", r.ID, err)
	}
	return nil
}

// Load reads every result in dir, in report order.
func Load(dir string) ([]Result, error) {
	paths, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, fmt.Errorf("load results: %w", err)
	}
	var out []Result
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("load results: %w", err)
		}
		var r Result
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, fmt.Errorf("load results: %s: %w", p, err)
		}
		out = append(out, r)
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Order < out[j].Order })
	return out, nil
}

// Benchmark is one benchmark the report expects, so that a missing result
// shows as missing rather than silently leaving its section out.
type Benchmark struct {
	ID, Title string
	Order     int
}

// Expected lists every benchmark of `make bench`, in report order.
var Expected = []Benchmark{
	{"throughput", "1. Throughput", 1},
	{"latency", "2. Latency", 2},
	{"attach", "3. Attach cost", 3},
	{"convergence", "4. Convergence", 4},
	{"ipam", "5. IPAM allocation rate", 5},
	{"scale", "6. Scale", 6},
	{"multicast", "7. Multicast", 7},
	{"names", "8. Name propagation", 8},
	{"gre", "9. GRE against VXLAN on Debian's kernel (test guest)", 9},
	{"churn", "10. Churn", 10},
}
