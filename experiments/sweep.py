r"""Methods x seeds x strengths of the forgetting study, one run after another.

  cljax-sweep --flagfile=experiments/presets/smoke.flags --root=runs/sweep \
      --methods=finetune,ewc,replay --seeds=0,1,2 --num_val=200 \
      --grid=ewc:ewc_lambda=1e2,1e4,1e6
  (or: python experiments/sweep.py ...; --methods=all --default_grids sweeps every
  registered method over its registered strengths)

Each run writes its own workdir ROOT/METHOD/STRENGTH/seedN; rerunning the same
command continues an interrupted sweep. Strengths are chosen on validation data
(--num_val), on the first seed. Then: cljax-report --root=ROOT.

Flags and code: cljax/cli/sweep.py (console script: cljax-sweep).
"""

from cljax.cli import sweep

if __name__ == "__main__":
  sweep.run()
