#!/usr/bin/env bash
# The runs behind benchmarks/results/accuracy.{json,md}, then the table:
#   in-domain      Banking77 and HWU64, 3 folds each (data.folds=3 in configs/fewshot.yaml), 5-way 1- and
#                  5-shot and 20-way 1-shot, 200 test episodes per cell and fold (600 pooled);
#   cross-dataset  CLINC150 without its banking and credit-card intents (configs/cross_clinc150.yaml)
#                  -> all Banking77 classes and all HWU64 classes, 600 test episodes per cell.
# Two phases, which may run at the same time (one thread each on a 2-core machine):
#   meta       the shipped recipe meta-trained per fold, meta-tested with the frozen rows beside it;
#   baselines  the fine-tuning baselines (adapter fine-tune, full fine-tune, SetFit): they do not
#              depend on the meta-init, so they run from an untrained init's config (meta.meta_steps=0)
#              on the first 34 episodes of each fold's cells (102 pooled) and the first 100
#              cross-dataset ones. The same seed and classes give the same episodes, so
#              benchmarks/accuracy.py pairs every row with logistic regression episode by episode.
# Every run is skipped when its report exists: an interrupted sequence continues where it stopped.
#
# Usage: benchmarks/accuracy_runs.sh RUNS_DIR meta|baselines|table [DATASET:FOLD|cross ...]
set -euo pipefail
runs=$1; phase=$2; shift 2
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(banking77:0 hwu64:0 banking77:1 hwu64:1 banking77:2 hwu64:2 cross)
frozen='logreg,proto,logreg_names,proto_names'
five='eval.n_way=5 eval.shots=[1,5]'
twenty='eval.n_way=20 eval.shots=[1]'

once() {  # once REPORT_DIR COMMAND...: run unless REPORT_DIR/report.json exists
  local dir=$1; shift
  [ -f "$dir/report.json" ] && { echo "have $dir/report.json"; return; }
  echo "+ $*"; /usr/bin/time -f "  %e s, max RSS %M KB" "$@" --quiet > /dev/null
}

for part in "${parts[@]}"; do
  [ "$phase" = table ] && break
  if [ "$phase" = meta ]; then
    methods="eval.methods=[meta,meta_init,$frozen]"; episodes=200; cross_episodes=600; steps=(); tag=""
  else
    methods='eval.methods=[finetune,full_finetune,setfit]'; episodes=34; cross_episodes=100
    steps=(meta.meta_steps=0); tag=_baselines
  fi
  if [ "$part" = cross ]; then
    run=$runs/cross_clinc150$tag; adapter=$run/adapter
    once "$run" metapeft train --local --config cross_clinc150 run.output_dir="$runs" run.name="cross_clinc150$tag" \
      "${steps[@]}" eval.dataset=banking77 eval.episodes=$cross_episodes eval.costly_episodes=100 $five "$methods"
    for ds in banking77 hwu64; do
      [ "$ds" = banking77 ] || once "$run/${ds}_5w" metapeft evaluate --adapter "$adapter" --out "$run/${ds}_5w" \
        eval.dataset=$ds eval.episodes=$cross_episodes eval.costly_episodes=100 $five "$methods"
      once "$run/${ds}_20w" metapeft evaluate --adapter "$adapter" --out "$run/${ds}_20w" \
        eval.dataset=$ds eval.episodes=$cross_episodes eval.costly_episodes=100 $twenty "$methods"
    done
  else
    ds=${part%:*}; fold=${part#*:}; name=${ds}_fold$fold$tag; run=$runs/$name
    once "$run" metapeft train --local --config fewshot run.output_dir="$runs" run.name="$name" \
      "${steps[@]}" data.dataset="$ds" data.fold="$fold" eval.episodes=$episodes eval.costly_episodes=34 $five \
      "$methods"
    once "$run/20w" metapeft evaluate --adapter "$run/adapter" --out "$run/20w" \
      eval.episodes=$episodes eval.costly_episodes=34 $twenty "$methods"
  fi
done
if [ "$phase" = table ]; then
  python "$(dirname "$0")/accuracy.py" $(find "$runs" -name report.json | sort)
fi
