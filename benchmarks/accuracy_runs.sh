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
# Cells run in the order given (default: the 1-shot cells first). A run whose report already holds
# its cell is skipped: an interrupted sequence continues where it stopped.
#
# Usage: [EPISODES=N] [CROSS_EPISODES=N] benchmarks/accuracy_runs.sh RUNS_DIR meta|baselines|table [PART ...] [-- CELL ...]
#   PART: DATASET:FOLD or cross (default: all);  CELL: 5w1s 20w1s 5w5s (default: all three)
#   EPISODES, CROSS_EPISODES: test episodes per cell and fold / per cross-dataset cell
set -euo pipefail
runs=$1; phase=$2; shift 2
parts=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do parts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
cells=("$@"); [ ${#cells[@]} -gt 0 ] || cells=(5w1s 20w1s 5w5s)
[ ${#parts[@]} -gt 0 ] || parts=(banking77:0 hwu64:0 banking77:1 hwu64:1 banking77:2 hwu64:2 cross)
if [ "$phase" = meta ]; then
  methods='eval.methods=[meta,meta_init,meta_logreg,logreg,proto,logreg_names,proto_names]'
  episodes=${EPISODES:-200}; cross_episodes=${CROSS_EPISODES:-600}; steps=(); tag=""
else
  methods='eval.methods=[finetune,full_finetune,setfit]'; episodes=${EPISODES:-34}; cross_episodes=${CROSS_EPISODES:-100}
  steps=(meta.meta_steps=0); tag=_baselines
fi

has() { grep -q "\"$2\"" "$1/report.json" 2>/dev/null; }  # has DIR CELL: DIR/report.json holds CELL
cell_args() { local c=$1; echo "eval.n_way=${c%w*} eval.shots=[$(echo "${c#*w}" | tr -d s)]"; }
go() {  # the command, timed (GNU time where installed: it also gives the peak memory)
  echo "+ $*"
  if [ -x /usr/bin/time ]; then /usr/bin/time -f "  %e s, max RSS %M KB" "$@" --quiet > /dev/null
  else local t0=$SECONDS; "$@" --quiet > /dev/null; echo "  $((SECONDS - t0)) s"; fi
}

for cell in "${cells[@]}"; do
  for part in "${parts[@]}"; do
    [ "$phase" = table ] && break 2
    if [ "$part" = cross ]; then
      name=cross_clinc150$tag; targets=(banking77 hwu64); trained_on=banking77
      size=(eval.episodes=$cross_episodes eval.costly_episodes=100)
      train=(--config cross_clinc150 eval.dataset=banking77)
    else
      ds=${part%:*}; fold=${part#*:}; name=${ds}_fold$fold$tag; targets=("$ds"); trained_on=$ds
      size=(eval.episodes=$episodes eval.costly_episodes=34)
      train=(--config fewshot data.dataset="$ds" data.fold="$fold")
      # HWU64's 64 classes in 3 folds leave 43 for meta-train + meta-val: 10-way validation
      # episodes need 10 of them (the default val_fraction gives 8)
      [ "$ds" = hwu64 ] && train+=(data.val_fraction=0.25)
    fi
    home=$runs/$name
    if [ ! -f "$home/adapter/metapeft.json" ]; then  # meta-train; its own meta-test is this cell
      go metapeft train --local "${train[@]}" run.output_dir="$runs" run.name="$name" "${steps[@]}" \
        "${size[@]}" $(cell_args "$cell") "$methods"
    fi
    for target in "${targets[@]}"; do
      out=$home/${target}_$cell
      if has "$out" "$cell" || { [ "$target" = "$trained_on" ] && has "$home" "$cell"; }; then
        echo "have $cell of $target in $home"; continue
      fi
      cross=(); [ "$part" = cross ] && cross=(eval.dataset="$target")
      go metapeft evaluate --adapter "$home/adapter" --out "$out" "${cross[@]}" "${size[@]}" \
        $(cell_args "$cell") "$methods"
    done
  done
done
if [ "$phase" = table ]; then
  python "$(dirname "$0")/accuracy.py" $(find "$runs" -name report.json | sort)
fi
