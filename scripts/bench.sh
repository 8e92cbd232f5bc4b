#!/usr/bin/env bash
# Runs the benchmark suite (package bench) on the multi-host harness and
# writes BENCHMARKS.md and bench/chart.png from what it measured.
# Needs root and the packages of scripts/install-deps.sh; `make bench` runs
# the set-up and builds bin/docker-net-plugin first.
#
#   BENCH_RUN=TestBenchLatency bash scripts/bench.sh   # one benchmark only
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench: run as root (the benchmarks create network namespaces and run dockerd)" >&2
  exit 1
fi

GO=${GO:-go}
RUN=${BENCH_RUN:-'^TestBench'}
# Result files of the last run stay here, so the report can be redrawn
# with `go run ./bench/report -in /tmp/dnp-bench-last` without measuring again.
out=${DNP_BENCH_OUT:-/tmp/dnp-bench-last}
mkdir -p "$out"
rm -f "$out"/*.json

plugin=bin/docker-net-plugin
echo "==> building $plugin"
CGO_ENABLED=0 $GO build -trimpath -o "$plugin" ./cmd/docker-net-plugin

echo "==> benchmarks (10 to 20 minutes, most of it scale and churn); results in $out"
rc=0
DNP_BENCH=1 DNP_BENCH_OUT="$out" DNP_PLUGIN_BIN="$PWD/$plugin" \
  $GO test -count=1 -timeout 40m -v -run "$RUN" ./bench/ || rc=$?

echo "==> report"
if ls "$out"/*.json >/dev/null 2>&1; then
  $GO run ./bench/report -in "$out" -md BENCHMARKS.md -png bench/chart.png
else
  echo "bench: no results were written" >&2
  rc=1
fi
if [ "$rc" -ne 0 ]; then
  echo "bench: some benchmarks failed (exit $rc); BENCHMARKS.md shows what was measured" >&2
fi
exit "$rc"
