#!/usr/bin/env bash
# The runs behind benchmarks/results/accuracy.{json,md}, then the table:
#   in-domain      Banking77 and HWU64, 3 folds each (configs/fewshot.yaml: data.folds=3), 5-way 1- and
#                  5-shot and 20-way 1-shot, 200 test episodes per cell and fold (600 pooled);
#   cross-dataset  CLINC150 without its banking and credit-card intents (configs/cross_clinc150.yaml)
#                  -> all Banking77 classes and all HWU64 classes, 600 test episodes per cell.
# The fine-tuning baselines (adapter fine-tune, full fine-tune, SetFit) score the first 34 episodes of
# each fold's cells (102 pooled) and the first 100 cross-dataset ones, paired on those prefixes.
# Every run is skipped when its report exists, so an interrupted sequence continues where it stopped.
#
# Usage: benchmarks/accuracy_runs.sh [RUNS_DIR] [DATASET:FOLD|cross ...]   (default: all of them)
set -euo pipefail
runs=${1:-runs/accuracy}; shift || true
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(banking77:0 hwu64:0 banking77:1 hwu64:1 banking77:2 hwu64:2 cross)
meta='eval.methods=[meta,meta_init,logreg,proto,logreg_names,proto_names]'
costly='eval.methods=[finetune,full_finetune,setfit]'
five='eval.n_way=5 eval.shots=[1,5]'
twenty='eval.n_way=20 eval.shots=[1]'

once() {  # once REPORT_DIR COMMAND...: run unless REPORT_DIR/report.json exists
  local dir=$1; shift
  [ -f "$dir/report.json" ] && { echo "have $dir/report.json"; return; }
  echo "+ $*"; /usr/bin/time -f "  %e s, max RSS %M KB" "$@" --quiet > /dev/null
}

for part in "${parts[@]}"; do
  if [ "$part" = cross ]; then
    run=$runs/cross_clinc150; adapter=$run/adapter
    once "$run" metapeft train --local --config cross_clinc150 run.output_dir="$runs" \
      eval.dataset=banking77 eval.episodes=600 $five "$meta"
    for ds in banking77 hwu64; do
      [ "$ds" = banking77 ] || once "$run/${ds}_5w" metapeft evaluate --adapter "$adapter" --out "$run/${ds}_5w" \
        eval.dataset=$ds eval.episodes=600 $five "$meta"
      once "$run/${ds}_20w" metapeft evaluate --adapter "$adapter" --out "$run/${ds}_20w" \
        eval.dataset=$ds eval.episodes=600 $twenty "$meta"
      for cells in five twenty; do
        once "$run/${ds}_${cells}_costly" metapeft evaluate --adapter "$adapter" --out "$run/${ds}_${cells}_costly" \
          eval.dataset=$ds eval.episodes=100 eval.costly_episodes=100 ${!cells} "$costly"
      done
    done
  else
    ds=${part%:*}; fold=${part#*:}; run=$runs/${ds}_fold$fold; adapter=$run/adapter
    once "$run" metapeft train --local --config fewshot run.output_dir="$runs" run.name="${ds}_fold$fold" \
      data.dataset="$ds" data.fold="$fold" eval.episodes=200 $five "$meta"
    once "$run/20w" metapeft evaluate --adapter "$adapter" --out "$run/20w" eval.episodes=200 $twenty "$meta"
    for cells in five twenty; do
      once "$run/${cells}_costly" metapeft evaluate --adapter "$adapter" --out "$run/${cells}_costly" \
        eval.episodes=34 eval.costly_episodes=34 ${!cells} "$costly"
    done
  fi
done
python "$(dirname "$0")/accuracy.py" $(find "$runs" -name report.json | sort)
