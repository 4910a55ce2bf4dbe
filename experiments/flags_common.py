"""absl flags shared by the experiment scripts, and their conversion to configs."""

import dataclasses

from absl import flags

from cljax.methods import MethodConfig, registry
from cljax.study import StudyConfig

_D = StudyConfig()
_M = MethodConfig()

# --- data ---------------------------------------------------------------------
flags.DEFINE_list("tasks", list(_D.tasks), "Tasks in training order: imdb, ag_news, or a "
                  "folder name under --data_dir (TASK/train.jsonl and TASK/test.jsonl).")
flags.DEFINE_list("ag_news_classes", ["sci_tech", "sports"],
                  "AG News classes, in head order (world, sports, business, sci_tech). The "
                  "study's prose names Sci/Tech and Sports (default: Sci/Tech -> head label "
                  "2, Sports -> 3); its original code kept world,sports.")
flags.DEFINE_multi_string("classes", [], "Classes of any task, TASK=name,name (repeatable); "
                          "e.g. --classes=imdb=neg,pos. Overrides --ag_news_classes.")
flags.DEFINE_string("data_dir", None, "Folder of local data, DIR/TASK/{train,test}.jsonl "
                    "(or .csv / .parquet) with text and label columns. Unset: the "
                    "Hugging Face hub (stanfordnlp/imdb, fancyzhx/ag_news).")
flags.DEFINE_integer("num_train", _D.num_train, "Training examples per task (-1: all).")
flags.DEFINE_integer("num_test", _D.num_test, "Test examples per task (-1: all).")
flags.DEFINE_integer("num_val", _D.num_val, "Validation examples per task, carved from the "
                     "training file (disjoint from the training subset), for choosing "
                     "method strengths without touching test data.")
flags.DEFINE_enum("subset", _D.subset, ["balanced", "head"],
                  "balanced: seeded, shuffled, label-balanced subsets. head: the literal "
                  "first rows, as the original script; on the label-sorted IMDb splits "
                  "that is a single class.")
flags.DEFINE_integer("max_length", _D.max_length, "Tokens per example (truncated, right "
                     "padded with eos).")
flags.DEFINE_string("cache_dir", None, "Tokenization cache (default ~/.cache/cljax).")
# --- model --------------------------------------------------------------------
flags.DEFINE_string("model", _D.model, "Hub id or local folder of a GPT-2 checkpoint "
                    "(config.json + model.safetensors or pytorch_model.bin).")
flags.DEFINE_enum("init", _D.init, ["pretrained", "random"], "Start from --model's weights, "
                  "or from a random init of --size.")
flags.DEFINE_string("size", _D.size, "Size for --init=random: gpt2, gpt2-medium, "
                    "gpt2-large, gpt2-xl, mini (4x256) or tiny (2x64).")
flags.DEFINE_string("tokenizer", None, "Tokenizer hub id or folder (default: --model).")
flags.DEFINE_enum("dtype", _D.dtype, ["float32", "bfloat16"], "Compute dtype; params and "
                  "optimizer state stay float32.")
flags.DEFINE_float("dropout", None, "Dropout for embeddings, attention and residuals "
                   "(default: the checkpoint's, 0.1 for GPT-2).")
flags.DEFINE_bool("remat", _D.remat, "Rematerialize blocks in the backward pass (memory).")
# --- optimization -------------------------------------------------------------
flags.DEFINE_integer("batch_size", _D.batch_size, "Training batch size.")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Evaluation batch size.")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs per task.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "AdamW peak learning rate, decayed "
                   "linearly to 0 over each task (Hugging Face Trainer default 5e-5).")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warmup steps per task.")
flags.DEFINE_float("weight_decay", _D.weight_decay, "AdamW weight decay (not on biases and "
                   "LayerNorm).")
flags.DEFINE_float("max_grad_norm", _D.max_grad_norm, "Clip gradients to this global norm "
                   "(0: off).")
flags.DEFINE_integer("grad_accum_steps", _D.grad_accum_steps, "Micro-batches per update.")
flags.DEFINE_integer("seed", _D.seed, "The one seed: subsets, init, data order, dropout.")
# --- method -------------------------------------------------------------------
flags.DEFINE_string("method", _D.method, "Method, or several joined by '+'. One of: " +
                    "; ".join(f"{n}: {d}" for n, d in sorted(registry.DESCRIPTIONS.items())))
_METHOD_HELP = {
    "ewc_lambda": "EWC / online EWC strength (penalty lam/2 * sum F (theta - theta*)^2).",
    "fisher": "Fisher estimator: empirical (true labels) or true (labels sampled from the "
              "model). Per-example gradients either way.",
    "fisher_samples": "Training examples of the finished task used for the Fisher.",
    "fisher_chunk": "Examples per vmapped chunk of per-example gradients (memory bound).",
    "online_gamma": "Online EWC decay of the running Fisher (Schwarz et al. 2018).",
    "si_c": "SI strength c (Zenke et al. 2017).",
    "si_xi": "SI damping xi.",
    "mas_lambda": "MAS strength (Aljundi et al. 2018).",
    "mas_samples": "Training examples used for MAS importances.",
    "l2_lambda": "L2-to-previous-solution strength.",
    "replay_size": "Replay buffer capacity (examples).",
    "replay_policy": "Buffer policy: reservoir (Vitter's R) or class_balanced.",
    "replay_batch_size": "Replayed examples added to each training batch.",
    "der_alpha": "DER/DER++ weight of the logit-matching term.",
    "der_beta": "DER++ weight of the replayed-label CE term.",
    "lwf_alpha": "LwF weight of the distillation term.",
    "lwf_temperature": "LwF distillation temperature.",
    "agem_batch_size": "A-GEM memory batch size.",
    "freeze": "freeze: train only the head, or the head and the last k blocks (last_k).",
    "freeze_k": "Blocks left trainable with --freeze=last_k.",
}
for _f in dataclasses.fields(MethodConfig):
  _default = getattr(_M, _f.name)
  _help = _METHOD_HELP.get(_f.name, _f.name)
  if isinstance(_default, bool):
    flags.DEFINE_bool(_f.name, _default, _help)
  elif isinstance(_default, int):
    flags.DEFINE_integer(_f.name, _default, _help)
  elif isinstance(_default, float):
    flags.DEFINE_float(_f.name, _default, _help)
  else:
    flags.DEFINE_string(_f.name, _default, _help)
# --- bookkeeping --------------------------------------------------------------
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Save a checkpoint every N "
                     "steps (and always at the end of each task).")
flags.DEFINE_integer("log_every", _D.log_every, "Log step metrics every N steps.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Evaluate every task every N steps, for "
                     "the accuracy curve (0: only after each task).")
flags.DEFINE_integer("stop_after_steps", None, "Testing: stop after N steps as if killed.")
# --- devices ------------------------------------------------------------------
flags.DEFINE_integer("mesh_data", _D.mesh_data, "Devices on the data-parallel mesh axis "
                     "(-1: all devices that --mesh_model leaves). --batch_size is global.")
flags.DEFINE_integer("mesh_model", _D.mesh_model, "Devices on the parameter-sharding axis "
                     "(params, optimizer state and EWC state split; for large/xl sizes).")
flags.DEFINE_bool("distributed", _D.distributed, "Multi-host: call "
                  "jax.distributed.initialize() (TPU pods, SLURM, or JAX_COORDINATOR_*).")

FLAGS = flags.FLAGS


def _none_if_negative(v):
  return None if v is not None and v < 0 else v


def parse_classes() -> tuple:
  classes = {}
  if "ag_news" in FLAGS.tasks:
    classes["ag_news"] = tuple(FLAGS.ag_news_classes)
  for item in FLAGS.classes:
    task, sep, names = item.partition("=")
    if not sep or not names:
      raise flags.ValidationError(f"--classes={item!r}: expected TASK=name,name.")
    classes[task.strip()] = tuple(n.strip() for n in names.split(","))
  return tuple(sorted(classes.items()))


def method_config() -> MethodConfig:
  return MethodConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(MethodConfig)})


def study_config(**overrides) -> StudyConfig:
  """A StudyConfig from the parsed flags."""
  kwargs = dict(
      tasks=tuple(FLAGS.tasks), classes=parse_classes(), data_dir=FLAGS.data_dir,
      num_train=_none_if_negative(FLAGS.num_train), num_test=_none_if_negative(FLAGS.num_test),
      num_val=FLAGS.num_val, subset=FLAGS.subset, max_length=FLAGS.max_length,
      model=FLAGS.model, init=FLAGS.init, size=FLAGS.size, tokenizer=FLAGS.tokenizer,
      dtype=FLAGS.dtype, dropout=FLAGS.dropout, remat=FLAGS.remat,
      batch_size=FLAGS.batch_size, eval_batch_size=FLAGS.eval_batch_size,
      epochs=FLAGS.epochs, learning_rate=FLAGS.learning_rate,
      warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
      max_grad_norm=FLAGS.max_grad_norm, grad_accum_steps=FLAGS.grad_accum_steps,
      seed=FLAGS.seed, method=FLAGS.method, method_config=method_config(),
      checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
      eval_every=FLAGS.eval_every, cache_dir=FLAGS.cache_dir,
      stop_after_steps=FLAGS.stop_after_steps, mesh_data=FLAGS.mesh_data,
      mesh_model=FLAGS.mesh_model, distributed=FLAGS.distributed)
  kwargs.update(overrides)
  return StudyConfig(**kwargs)


def flag_values() -> dict:
  """The values of this project's flags (not absl's own), for results.json."""
  ours = set()
  for module, module_flags in FLAGS.flags_by_module_dict().items():
    if "absl" not in module:
      ours.update(f.name for f in module_flags)
  return {name: FLAGS[name].value for name in sorted(ours)}
