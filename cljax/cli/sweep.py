r"""Methods x seeds x strengths of the forgetting study, one run after another.

  cljax-sweep --flagfile=experiments/presets/smoke_shared.flags --root=runs/sweep \
      --methods=finetune,ewc,replay --seeds=0,1,2 --num_val=200 \
      --grid=ewc:ewc_lambda=1e2,1e4,1e6
  (or: python experiments/sweep.py ...; --methods=all --default_grids sweeps every
  registered method over its registered strengths)

Each run writes its own workdir ROOT/METHOD/STRENGTH/seedN; rerunning the same
command continues an interrupted sweep. Strengths are chosen on validation data
(--num_val), on the first seed or on --selection_seed. --orders runs the sweep once
per task order (ROOT/orderK). Then: cljax-report --root=ROOT.
"""

import sys

from absl import flags
import jax

from cljax import cli
from cljax import report
from cljax.cli import flags as cljax_flags
from cljax.study import sweep

cljax_flags.define_flags()
flags.adopt_module_key_flags(cljax_flags)
_ROOT = flags.DEFINE_string("root", None, "Folder of the sweep.", required=True)
_METHODS = flags.DEFINE_list("methods", ["finetune"], "Methods (each may be a '+' "
                             "composition); 'all': every registered method.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_GRID = flags.DEFINE_multi_string("grid", [], "Strengths to choose from, METHOD:FIELD=v1,v2 "
                                  "(repeatable), e.g. ewc:ewc_lambda=1e2,1e4.")
_DEFAULT_GRIDS = flags.DEFINE_bool("default_grids", False, "Sweep each method's registered "
                                   "strength grid, where --grid gives none.")
_SELECTION_SEED = flags.DEFINE_integer(
    "selection_seed", None, "Choose strengths on this seed (not among --seeds, and left "
    "out of the report); default: on the first of --seeds.")
_ORDERS = flags.DEFINE_multi_string(
    "orders", [], "Task orders, each a comma-separated --tasks (repeatable): one sweep per "
    "order, in ROOT/order1, ROOT/order2, ...; the report has a table per order and one "
    "over them. Default: the one order of --tasks.")
_ONLY_ORDERS = flags.DEFINE_list(
    "only_orders", [], "Of --orders, run only these (1-based; each still in ROOT/orderK, "
    "K its place in --orders); default: all.")
_PARALLEL = flags.DEFINE_integer(
    "parallel_runs", 1, "Train up to N seeds of a method side by side in one program "
    "(cljax.study.parallel: each run's own data, dropout, method state, checkpoints and "
    "outputs; where the runs share their devices, each run's step is the same run's step "
    "alone, bit for bit; needs --dropout_rng_impl=threefry, the default); 1: one after "
    "another. A method's strength candidates run side by side too where it reads the "
    "strength as a traced value (EWC, online EWC, MAS, L2, SI, LwF); on several devices "
    "the runs are laid over them (vmapped, which rounds otherwise).", lower_bound=1)
_REPORT = flags.DEFINE_bool("report", True, "Write the report when the sweep ends.")


def main(argv):
  cli.checked(argv, _sweep)   # bad input: one log line, before any run


def _sweep():
  base = cljax_flags.study_config()
  methods = sweep.expand_methods(_METHODS.value, base.head)
  grids = sweep.parse_grid(_GRID.value)
  if _DEFAULT_GRIDS.value:
    grids = {**sweep.default_grids(methods), **grids}
  seeds = [int(s) for s in _SEEDS.value]
  sweep.check_arguments(methods, seeds, grids, _SELECTION_SEED.value)
  kwargs = dict(methods=methods, seeds=seeds, grids=grids,
                flags=cljax_flags.flag_values(), selection_seed=_SELECTION_SEED.value,
                parallel_runs=_PARALLEL.value)
  if _ORDERS.value:
    orders = sweep.parse_orders(_ORDERS.value)
    sweep.check_orders(base, orders)   # each a valid --tasks, before any run
    outs = sweep.run_orders(base, _ROOT.value, orders,
                            only=[int(k) for k in _ONLY_ORDERS.value], **kwargs)
  elif _ONLY_ORDERS.value:
    raise ValueError("--only_orders picks among --orders, and no --orders is given.")
  else:
    outs = [sweep.run_sweep(base, _ROOT.value, **kwargs)]
  print(f"{sum(len(o['runs']) for o in outs)} runs under {_ROOT.value}")
  if _REPORT.value and jax.process_index() == 0:
    print(report.write_report(_ROOT.value)["markdown"])


def run():
  cli.run_main(main, sys.modules[__name__])
