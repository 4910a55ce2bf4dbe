#!/usr/bin/env bash
# Every run behind the three-task stream's results (docs/results.md, "The three-task
# stream"), most wanted first; each sweep continues where it stopped, so rerunning
# this script after an interruption (or in the next session) picks up the first run
# not yet finished. Run from the repository root; about 22 hours on a 2-core CPU
# (estimated from the stages' measured times; LAMOL's sweep took 1 h 32 min for order 1
# and 1 h 37 min for order 3, beside a CI run, and its ablation 1 h 22 min).
#   bash experiments/stream3.sh            # everything
#   bash experiments/stream3.sh reports    # only the reports and kept runs
# Stages (in this order): the mini base (the kept one copied, else 23-34 min); the cheap
# rows on seeds 0-2 in the three orders; generative replay and its gamma-0 ablation;
# the cheap rows' seeds 3-4 (the README's headline); LAMOL's sweep (with --head=lm, in
# each order LAMOL, then fine-tuning, replay, joint and EWC), its gamma-0 ablation,
# and LAMOL_TASK in order 2 (3 runs, 34 min).
# Then the reports, each kept under docs/results/ (`reports` alone also keeps a sweep
# stopped part way, for the next clone to resume), and the generative methods beside
# their ablations (docs/results/stream3_*_compared).
set -euo pipefail
P=experiments/presets

reports() {
  for root in stream3 stream3_generative stream3_generative_gamma0 stream3_lamol \
              stream3_lamol_gamma0 stream3_lamol_task; do
    if [[ -d runs/$root ]]; then
      python experiments/report.py --root=runs/$root --keep=docs/results/$root
    fi
  done
  # Each generative method beside the cheap rows and its gamma-0 ablation, paired by
  # order and seed with fine-tuning and with the ablation (from the kept copies), on
  # the seeds the generative sweeps ran (the cheap rows have 5).
  local d=docs/results
  if [[ -d $d/stream3_generative_gamma0 ]]; then
    python experiments/report.py --root=$d/stream3/runs --root=$d/stream3_generative/runs \
      --root=$d/stream3_generative_gamma0/runs --paired_with=finetune --paired_with=replay \
      --paired_with="generative_replay (gr_gamma=0)" --outdir=$d/stream3_generative_compared \
      --seeds=0,1,2
  fi
  if [[ -d $d/stream3_lamol_gamma0 ]]; then
    python experiments/report.py --root=$d/stream3_lamol/runs \
      --root=$d/stream3_lamol_gamma0/runs --paired_with=finetune --paired_with=replay \
      --paired_with=ewc --paired_with="lamol (lamol_gamma=0)" \
      --outdir=$d/stream3_lamol_compared \
      --seeds=0,1,2
  fi
  # LAMOL_TASK (order 2 only) beside LAMOL and its references in that order.
  if [[ -d $d/stream3_lamol_task ]]; then
    python experiments/report.py --root=$d/stream3_lamol/runs/order2 \
      --root=$d/stream3_lamol_task/runs --paired_with=finetune --paired_with=replay \
      --paired_with=lamol --outdir=$d/stream3_lamol_task_compared --seeds=0,1,2
  fi
}

# The runs of a sweep kept in the repository (report --keep) copied into runs/ROOT,
# never over a run there, where they started from the base in runs/pretrain_mini:
# the sweep then reads them as finished and runs the rest. Kept runs of another base,
# or of one they did not record (the headline's, docs/results.md), are not copied:
# that sweep runs afresh on this base, and its report then keeps into a new folder
# (report --keep refuses to mix bases in one).
restore() {
  local kept=docs/results/$1/runs
  [[ -d $kept ]] || return 0
  if python -c 'import sys
from cljax.study import StudyConfig, sweep
try: sweep.check_base(sys.argv[1], StudyConfig(init="pretrained", model=sys.argv[2]))
except ValueError as e: sys.exit(f"stream3.sh: kept runs not restored: {e}")' \
      "$kept" runs/pretrain_mini/hf_model; then
    mkdir -p runs/$1 && cp -rn "$kept"/. runs/$1/
  fi
}

sweep() {   # sweep ROOT FLAGS...
  local root=$1; shift
  restore "$root"
  python experiments/sweep.py "$@" --root=runs/$root
}

if [[ "${1:-}" == reports ]]; then reports; exit; fi

# The base: the one kept in the repository (docs/results/pretrain_mini_b, which
# LAMOL's sweeps start from; pretrained again, it came out with other weights:
# docs/lm.md), else pretrained here.
if [[ ! -f runs/pretrain_mini/hf_model/config.json ]]; then
  if [[ -f docs/results/pretrain_mini_b/hf_model/model.safetensors ]]; then
    mkdir -p runs/pretrain_mini && cp -r docs/results/pretrain_mini_b/hf_model runs/pretrain_mini/
  else
    python experiments/instruct.py --flagfile=$P/pretrain_mini.flags --workdir=runs/pretrain_mini
  fi
fi
sweep stream3 --flagfile=$P/sweep_stream3.flags --seeds=0,1,2
sweep stream3_generative --flagfile=$P/sweep_stream3_generative.flags
sweep stream3_generative_gamma0 --flagfile=$P/sweep_stream3_generative.flags --gr_gamma=0
sweep stream3 --flagfile=$P/sweep_stream3.flags
sweep stream3_lamol --flagfile=$P/sweep_stream3_lamol.flags
sweep stream3_lamol_gamma0 --flagfile=$P/sweep_stream3_lamol_gamma0.flags
sweep stream3_lamol_task --flagfile=$P/sweep_stream3_lamol_task.flags
reports
