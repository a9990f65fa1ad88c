#!/usr/bin/env bash
# Meta-train + meta-test the Banking77 benchmark on folds given as arguments (default: 0 1),
# then print every fold's table. Usage: benchmarks/banking77_folds.sh [FOLD ...] [-- overrides]
set -euo pipefail
folds=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do folds+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#folds[@]} -gt 0 ] || folds=(0 1)
for f in "${folds[@]}"; do
  metapeft train --local --config banking77 data.fold="$f" run.name="banking77_fold$f" "$@"
done
for f in "${folds[@]}"; do cat "runs/banking77_fold$f/report.md"; done
