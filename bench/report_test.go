package bench

import (
	"bytes"
	"image/png"
	"math"
	"strings"
	"testing"
)

func TestSummarize(t *testing.T) {
	s := Summarize([]float64{5, 1, 4, 2, 3})
	if s.N != 5 || s.Median != 3 || s.Min != 1 || s.Max != 5 {
		t.Errorf("Summarize = %+v", s)
	}
	if got := Summarize([]float64{1, 2, 3, 4}).Median; got != 2.5 {
		t.Errorf("median of 1..4 = %v, want 2.5", got)
	}
	many := make([]float64, 101)
	for i := range many {
		many[i] = float64(i)
	}
	if got := Summarize(many).P99; got != 99 {
		t.Errorf("p99 of 0..100 = %v, want 99", got)
	}
	r := Row{Samples: []float64{2, 2, 2}, Base: []float64{8, 8}}
	if got := r.Ratio(); got != 0.25 {
		t.Errorf("ratio = %v, want 0.25", got)
	}
	if got := (Row{Samples: []float64{1}}).Ratio(); !math.IsNaN(got) {
		t.Errorf("ratio without baseline = %v, want NaN", got)
	}
	if got := (Row{Samples: []float64{-5}, Base: []float64{-2}}).Ratio(); !math.IsNaN(got) {
		t.Errorf("ratio of negative medians = %v, want NaN", got)
	}
}

func TestFormatNumber(t *testing.T) {
	for v, want := range map[float64]string{1234.5: "1234", 12.34: "12.3", 1.234: "1.23", 0.1234: "0.123", 0: "0", math.NaN(): "—"} {
		if got := FormatNumber(v); got != want {
			t.Errorf("FormatNumber(%v) = %q, want %q", v, got, want)
		}
	}
}

// The report shows what the result files hold, and says so when one is
// missing.
func TestReport(t *testing.T) {
	dir := t.TempDir()
	res := Result{ID: "throughput", Order: 1, Title: "1. Throughput", Measures: "m", Baseline: "b", RunAlone: "go test -run X",
		Rows: []Row{
			{Name: "overlay", Unit: "Gbit/s", Samples: []float64{1, 2, 3}, BaseName: "underlay", Base: []float64{4, 4, 4}, Chart: "Throughput"},
			{Name: "gre", Unit: "Gbit/s", Unavailable: "not available on this kernel"},
		}}
	if err := Save(dir, res); err != nil {
		t.Fatal(err)
	}
	results, err := Load(dir)
	if err != nil || len(results) != 1 {
		t.Fatalf("Load = %v, %v", results, err)
	}
	var md bytes.Buffer
	if err := WriteMarkdown(&md, Environment{Command: "make bench"}, results, "bench/chart.png"); err != nil {
		t.Fatal(err)
	}
	out := md.String()
	for _, want := range []string{
		"| overlay | Gbit/s | 3 | 2.00 | 1.00 | 3.00 | underlay | 3 | 4.00 | 4.00 | 4.00 | 0.500× |",
		"| gre | Gbit/s | 0 | not available on this kernel |",
		"## 2. Latency\n\nNo result in this run",
		"![Throughput and latency: overlay versus underlay](bench/chart.png)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	var img bytes.Buffer
	if err := WriteChart(&img, results); err != nil {
		t.Fatal(err)
	}
	if _, err := png.Decode(&img); err != nil {
		t.Fatalf("chart is not a PNG: %v", err)
	}
	if err := WriteChart(&img, []Result{{ID: "x"}}); err == nil {
		t.Error("chart with nothing to draw: no error")
	}
}
