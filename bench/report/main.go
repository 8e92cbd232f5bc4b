// Command report turns the result files of a benchmark run into
// BENCHMARKS.md and a PNG chart:
//
//	go run ./bench/report -in DIR -md BENCHMARKS.md -png bench/chart.png
//
// It reads only DIR (written by the benchmarks in package bench) and the
// machine's own description (kernel, CPU, tool versions).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/dnplabs/docker-net-plugin/bench"
)

func main() {
	in := flag.String("in", "", "directory of result files (DNP_BENCH_OUT of the run)")
	md := flag.String("md", "BENCHMARKS.md", "Markdown file to write")
	chart := flag.String("png", "bench/chart.png", "PNG chart to write")
	command := flag.String("command", "make bench", "command named as the report's origin")
	flag.Parse()
	if err := run(*in, *md, *chart, *command); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func run(in, md, chart, command string) error {
	if in == "" {
		return fmt.Errorf("-in is required")
	}
	results, err := bench.Load(in)
	if err != nil {
		return err
	}
	if len(results) == 0 {
		return fmt.Errorf("no result files in %s: did the benchmarks run (DNP_BENCH=1, as root)?", in)
	}
	chartRef := ""
	var png bytes.Buffer
	if err := bench.WriteChart(&png, results); err != nil {
		fmt.Fprintln(os.Stderr, "report: no chart:", err)
	} else {
		if err := os.WriteFile(chart, png.Bytes(), 0o644); err != nil {
			return fmt.Errorf("write chart: %w", err)
		}
		rel, err := filepath.Rel(filepath.Dir(md), chart)
		if err != nil {
			rel = chart
		}
		chartRef = filepath.ToSlash(rel)
	}
	var out bytes.Buffer
	if err := bench.WriteMarkdown(&out, environment(command), results, chartRef); err != nil {
		return err
	}
	if err := os.WriteFile(md, out.Bytes(), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", md, err)
	}
	fmt.Printf("report: wrote %s and %s from %d result files in %s\n", md, chart, len(results), in)
	return nil
}

func environment(command string) bench.Environment {
	env := bench.Environment{
		Date:    time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		Cores:   runtime.NumCPU(),
		Go:      runtime.Version(),
		Command: command,
		Kernel:  firstLine(output("uname", "-r")),
		Docker:  firstLine(output("dockerd", "--version")),
		Iperf:   firstLine(output("iperf3", "--version")),
		CPU:     "unknown CPU",
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				env.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return env
}

func output(name string, args ...string) string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).Output()
	if err != nil {
		return name + ": unknown version"
	}
	return string(out)
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
