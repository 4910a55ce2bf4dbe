"""The config is defined once: every StudyConfig field and every registered method
hyperparameter is a flag, and a method added in one file (here, this test file) is
selectable from the study's flags, listed by --help and runs end to end."""

import dataclasses
import glob
import json
import os

from absl import flags as absl_flags
import jax
import jax.numpy as jnp
import pytest

from cljax import study
from cljax.cli import flags as cljax_flags
from cljax.methods import Method, MethodConfig, hparam, register, registry
from cljax.study import sweep
from cljax.study.config import StudyConfig
from conftest import SHARED


def _parse(argv=()):
  fv = absl_flags.FlagValues()
  cljax_flags.define_flags(fv)
  fv(["prog", *argv])
  return fv


def test_an_old_flagfile_s_dropout_rng_sets_dropout_rng_impl(tmp_path):
  """``--dropout_rng`` (the setting's first name) in an old flagfile still loads; the
  run records the setting under its current name only."""
  flagfile = tmp_path / "old.flags"
  flagfile.write_text("--init=random\n--dropout_rng=rbg\n")
  fv = _parse([f"--flagfile={flagfile}"])
  assert cljax_flags.study_config(fv).dropout_rng_impl == "rbg"
  recorded = cljax_flags.flag_values(fv)
  assert recorded["dropout_rng_impl"] == "rbg" and "dropout_rng" not in recorded
  assert cljax_flags.study_config(_parse()).dropout_rng_impl == "threefry"


def test_every_config_field_is_a_flag_with_its_default():
  fv = _parse()
  cfg = cljax_flags.study_config(fv)
  assert cfg == StudyConfig()
  for f in dataclasses.fields(StudyConfig):
    if f.name != "method_config":
      assert f.name in fv, f.name
      assert f.metadata["help"][:30] in fv[f.name].help
  for name, hp in registry.hparams().items():
    assert fv[name].default == hp.default and fv[name].help.endswith(hp.help)


def test_flags_convert_to_the_config():
  fv = _parse(["--tasks=imdb,x", "--num_train=-1", "--classes=imdb=neg,pos",
               "--classes=x=a,b", "--ewc_lambda=3", "--fisher=true", "--keep_checkpoints=5",
               "--dropout=0.2"])
  cfg = cljax_flags.study_config(fv, seed=7)
  assert cfg.tasks == ("imdb", "x") and cfg.num_train is None and cfg.seed == 7
  assert cfg.keep_checkpoints == 5 and cfg.dropout == 0.2
  assert cfg.task_classes() == {"imdb": ("neg", "pos"), "x": ("a", "b")}
  assert cfg.method_config == MethodConfig(ewc_lambda=3.0, fisher="true")
  assert cfg.method_config.to_dict()["ewc_lambda"] == 3.0
  with pytest.raises(absl_flags.IllegalFlagValueError):
    _parse(["--fisher=approximate"])
  assert StudyConfig(classes=(("imdb", ("neg", "pos")),)).task_classes() == {
      "ag_news": ("sci_tech", "sports"), "imdb": ("neg", "pos")}
  with pytest.raises(ValueError, match="TASK=name,name"):
    StudyConfig(classes=("imdb",)).task_classes()
  with pytest.raises(TypeError, match="Unknown method hyperparameters"):
    MethodConfig(ewc_lamda=1.0)


@pytest.mark.parametrize("cfg", [
    StudyConfig(),
    StudyConfig(tasks=("imdb", "ag_news:world+business", "x"), num_train=None, num_test=7,
                classes=(("x", ("a", "b")),), head="lm",
                label_words=("imdb=bad,good", "x=yes,no"), data_dir="/d", dropout=0.0,
                method="ewc+replay", method_config=MethodConfig(ewc_lambda=1e-7, fisher="true"),
                learning_rate=3e-5, dropout_rng_impl="rbg", stop_on_divergence=True, seed=11,
                eval_every=3, init="random", size="tiny")],
    ids=["defaults", "everything_set"])
def test_a_run_s_recorded_flags_make_its_config_again(cfg, tmp_path):
  """``results.json``'s ``flags`` (to_flags) written out as ``run.flags`` parse, through
  the experiment scripts' flags, into the same config; and read back from the dict."""
  from cljax.study.config import flagfile
  path = tmp_path / "run.flags"
  path.write_text(flagfile(cfg.to_flags()))
  assert cljax_flags.study_config(_parse([f"--flagfile={path}"])) == cfg
  assert StudyConfig.from_flags(json.loads(json.dumps(cfg.to_flags()))) == cfg


# ----------------------------------------------------------------------------
# A toy method, defined in this file only
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToyConfig:
  toy_pull: float = hparam(0.5, "Toy: strength of the pull towards the last solution.")
  toy_distance: str = hparam("abs", "Toy: the distance pulled along.",
                             choices=("abs", "square"))


def toy(hp: ToyConfig, ctx) -> Method:
  del ctx
  dist = jnp.abs if hp.toy_distance == "abs" else jnp.square

  def init(params):
    return jax.tree.map(jnp.zeros_like, params), jnp.zeros(())

  def loss(state, sctx):
    anchor, active = state
    total = sum(jnp.sum(dist(p - a)) for p, a in zip(jax.tree.leaves(sctx.params),
                                                      jax.tree.leaves(anchor)))
    return hp.toy_pull * active * total, ()

  def after_task(state, tctx):
    del state
    return jax.tree.map(jnp.copy, tctx.params), jnp.ones(())

  return Method(name="toy", init=init, loss=loss, after_task=after_task)


@pytest.fixture
def toy_registered():
  register("toy", "a toy pull towards the last solution", ToyConfig)(toy)
  yield
  registry.unregister("toy")


@pytest.mark.slow
def test_a_method_added_in_one_file_is_a_flag_and_runs(toy_registered, tiny_data_dir,
                                                        tiny_tokenizer_dir, tmp_path):
  fv = _parse([f"--data_dir={tiny_data_dir}", f"--tokenizer={tiny_tokenizer_dir}",
               "--init=random", "--size=tiny", "--num_train=32", "--num_test=16",
               "--max_length=24", "--eval_batch_size=16", "--learning_rate=2e-3",
               "--checkpoint_every=0", "--log_every=1", "--method=toy", "--toy_pull=2.5",
               "--toy_distance=square"])
  help_text = fv.get_help()
  assert "--toy_pull" in help_text and "strength of the pull" in help_text
  assert "toy: a toy pull towards the last solution" in " ".join(help_text.split())
  cfg = cljax_flags.study_config(fv)
  assert cfg.method_config.toy_pull == 2.5
  r = study.run(cfg, str(tmp_path), flags=cljax_flags.flag_values(fv))
  assert r["method"] == "toy" and r["method_config"]["toy_pull"] == 2.5
  assert r["flags"]["toy_distance"] == "square"
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    train = [x for x in map(json.loads, f) if "loss" in x]
  # No pull while learning the first task; a live one on the second, once the params
  # have left the anchor (the first step starts on it).
  assert all(x["penalty"] == 0 for x in train if x["task"] == 0)
  second = [x for x in train if x["task"] == 1]
  assert second[0]["penalty"] == 0 and all(x["penalty"] > 0 for x in second[1:])
  # Gone after unregistering: the flags no longer list it.
  registry.unregister("toy")
  assert "--toy_pull" not in _parse().get_help()
  register("toy", "a toy pull towards the last solution", ToyConfig)(toy)


# ----------------------------------------------------------------------------
# The shipped sweep presets pass the sweep's checks
# ----------------------------------------------------------------------------

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SWEEP_ONLY = ("methods", "seeds", "grid", "selection_seed", "orders", "default_grids",
               "parallel_runs", "report", "root", "only_orders")


def _check_sweep_preset(path):
  """A sweep flagfile read as experiments/sweep.py reads it (nested flagfiles
  expanded, a repeated list flag's last value wins, --grid and --orders accumulate),
  then the checks the sweep makes before its first run."""
  fv = absl_flags.FlagValues()
  cljax_flags.define_flags(fv)
  own, rest = {}, []
  for arg in fv.read_flags_from_files([f"--flagfile={path}"], force_gnu=False):
    name, _, value = arg[2:].partition("=")
    if name in _SWEEP_ONLY:
      own.setdefault(name, []).append(value)
    else:
      rest.append(arg)
  fv(["prog", *rest])
  base = cljax_flags.study_config(fv)
  methods = sweep.expand_methods(own["methods"][-1].split(","), base.head)
  seeds = [int(s) for s in own.get("seeds", ["0,1,2"])[-1].split(",")]
  selection = own.get("selection_seed")
  sweep.check_arguments(methods, seeds, sweep.parse_grid(own.get("grid", [])),
                        int(selection[-1]) if selection else None)
  if os.path.isdir(os.path.join(SHARED, "data")):   # the orders read the local data
    sweep.check_orders(base, sweep.parse_orders(own.get("orders", [])))


def test_every_sweep_preset_passes_the_sweeps_checks(monkeypatch, tmp_path):
  """Each experiments/presets/sweep_*.flags would start: its methods exist, each
  strength grid is for a swept method, the selection seed is not reported, and (with
  the project's shared data beside the repository) each order is a valid --tasks. A
  flagfile that layers --methods over a preset with a grid for another method fails
  the same check the sweep makes."""
  monkeypatch.chdir(_ROOT)
  presets = sorted(glob.glob(os.path.join(_ROOT, "experiments", "presets", "sweep_*.flags")))
  assert len(presets) >= 8
  for path in presets:
    _check_sweep_preset(path)
  layered = tmp_path / "layered.flags"
  layered.write_text(f"--flagfile={_ROOT}/experiments/presets/sweep_stream3_lamol.flags\n"
                     "--methods=lamol\n")
  with pytest.raises(ValueError, match=r"Strength grids for \['ewc'\]"):
    _check_sweep_preset(str(layered))
