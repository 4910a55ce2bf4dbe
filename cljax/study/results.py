"""A study's results: the ``results.json`` dict (the public contract: the accuracy
matrices, their metrics, the flags, the data and model, timing), the generated
samples a person reads (``generated_samples.txt``) and every kept pseudo-example with
its label (``pseudo_samples.jsonl``), and the figures."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess

from absl import logging
import jax
import numpy as np

from cljax import data as data_lib
from cljax import metrics as metrics_lib
from cljax.study.config import flagfile

# Each run's own flags as an absl flagfile, beside its results.json.
RUN_FLAGS = "run.flags"


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # cljax/


def code_version(package_dir: str = PACKAGE_DIR) -> dict | None:
  """The git commit of the cljax checkout ``package_dir`` is in, and whether the
  package's files differ from that commit (an edit, or a new file git does not
  ignore); None where it is no git checkout of cljax (an installed wheel, or a folder
  inside some other repository)."""
  def git(*args):
    return subprocess.run(["git", "-C", package_dir, *args], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()
  try:
    top = git("rev-parse", "--show-toplevel")
    if os.path.realpath(os.path.join(top, "cljax")) != os.path.realpath(package_dir):
      return None
    return {"commit": git("rev-parse", "HEAD"),
            "modified": bool(git("status", "--porcelain", "--", "."))}
  except (OSError, subprocess.SubprocessError):
    return None


@functools.cache
def run_code_version() -> dict | None:
  """:func:`code_version` of this process's cljax, read once, when its first run
  starts (``run`` calls it before any work): the code the process imported, not an
  edit made while it ran. Nothing runs ``git`` at import."""
  return code_version()


def count_params(params, mask=None) -> int:
  """How many parameters ``params`` holds (where ``mask`` is True)."""
  leaves = jax.tree.leaves(params)
  keep = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  return int(sum(np.prod(x.shape) for x, k in zip(leaves, keep) if k))


def fmt_accs(tasks, accs) -> str:
  """``imdb 0.812, ag_news 0.950``: accuracies named by task, for the log."""
  return ", ".join(f"{t.name} {a:.3f}" for t, a in zip(tasks, accs))


def make_results(study, record, command_flags: dict | None, wall_s: float) -> dict:
  """The results dict (the public contract of ``results.json``) of a
  :class:`~cljax.study.Study` and its :class:`~cljax.study.RunRecord`. ``flags`` are
  the run's own (its config's, :meth:`StudyConfig.to_flags`: what reruns it);
  ``command_flags`` those of the program that ran it (a sweep's, with its orders and
  seeds), when one did."""
  cfg, model = study.cfg, study.model
  rows, task_rows = record.ended("accuracy"), record.ended("task_aware_accuracy")
  val_rows = record.ended("val_accuracy")
  train_seconds = [t.train_seconds for t in record.tasks]
  return {
      "tasks": [t.name for t in study.tasks],
      "head": cfg.head,
      "task_classes": {t.name: {"classes": list(t.class_names),
                                "head_labels": list(t.head_labels),
                                **({"label_words": list(t.label_words), "prompt": list(t.prompt)}
                                   if cfg.head == "lm" else {})} for t in study.tasks},
      "accuracy_matrix": rows,
      "task_aware_accuracy_matrix": task_rows,
      "task_inference_accuracy_matrix": record.ended("task_inference_accuracy") or None,
      "baseline_accuracy": record.baseline,
      "task_aware_baseline_accuracy": record.task_aware_baseline,
      "metrics": metrics_lib.summarize(rows, baseline=record.baseline),
      "task_aware_metrics": metrics_lib.summarize(task_rows,
                                                  baseline=record.task_aware_baseline),
      "val_accuracy_matrix": val_rows or None,
      "val_task_aware_accuracy_matrix": record.ended("val_task_aware_accuracy") or None,
      "val_metrics": metrics_lib.summarize(val_rows) if val_rows else None,
      "method": cfg.method,
      "method_config": cfg.method_config.to_dict(),
      "seed": cfg.seed,
      "flags": cfg.to_flags(),
      "command_flags": command_flags,
      "data": {d.task.name: {"train": data_lib.size(d.train), "test": data_lib.size(d.test),
                             "val": data_lib.size(d.val) if d.val else 0,
                             "left_out_as_pretraining_text": d.excluded}
               for d in study.task_data},
      "model": {"source": cfg.model if cfg.init == "pretrained" else f"random:{cfg.size}",
                # The weights it started from (a record older than base_sha256: those
                # at --model when it ended).
                "source_sha256": record.base_sha256 or study.base_sha256,
                "family": model.config.family,
                "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
                "vocab_size": model.config.vocab_size, "dtype": cfg.dtype,
                "parameters": count_params(study.param_shapes),
                "trainable_parameters_per_task": record.ended("trainable_parameters"),
                "train_state_bytes_per_task": record.ended("state_bytes")},
      "curve": record.curve,
      "warnings": record.warnings,
      "method_reports": record.method_reports,
      "timing": {"wall_seconds_this_process": wall_s,
                 "train_seconds_per_task": train_seconds,
                 "train_seconds": float(sum(train_seconds)),
                 "eval_seconds": record.eval_seconds,
                 "method_seconds_per_task": record.ended("method_seconds"),
                 "steps_per_task": record.ended("steps")},
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": [d.device_kind for d in jax.devices()],
                      "python": platform.python_version(),
                      "cljax_git": run_code_version()},
  }


def _samples_text(reports: list[dict]) -> str:
  """What a generative method replayed, for a person to read: per task boundary, the
  counts, the cost and the first samples of each earlier task."""
  out = []
  for r in reports:
    out.append(f"== before task {r['task']} ({r['task_name']}), {r.get('method', '')}: "
               f"{r.get('kept')} of {r.get('requested')} pseudo-examples kept "
               f"(dropped {r.get('dropped')}), {r.get('generated_tokens')} tokens in "
               f"{r.get('generation_seconds', 0):.1f} s "
               f"({r.get('tokens_per_second', 0):.0f} tokens/s)")
    if r.get("label_balance"):
      out.append("labels of the kept examples: " + "; ".join(
          f"{task} " + ", ".join(f"{c} {n}" for c, n in counts.items())
          for task, counts in r["label_balance"].items()))
    for task, texts in r["samples"].items():
      out.append(f"-- written as {task}:")
      out.extend(f"{i + 1}. {t!r}" for i, t in enumerate(texts))
    out.append("")
  return "\n".join(out)


def write_run_flags(workdir: str, flags: dict) -> None:
  """``workdir/run.flags``: the run's own ``flags`` as an absl flagfile."""
  with open(os.path.join(workdir, RUN_FLAGS), "w") as f:
    f.write("# The flags of this run: rerun it with python experiments/forgetting.py "
            f"--flagfile={RUN_FLAGS} --workdir=NEW_DIR\n" + flagfile(flags))


def write_results(results: dict, workdir: str) -> None:
  """``results.json``, ``run.flags`` and the figures."""
  reports = results.get("method_reports") or []
  kept = [dict(s, boundary=r["task"]) for r in reports for s in r.get("kept_samples") or []]
  write_run_flags(workdir, results["flags"])
  with open(os.path.join(workdir, "results.json"), "w") as f:   # the samples go apart
    json.dump(dict(results, method_reports=[
        {k: v for k, v in r.items() if k != "kept_samples"} for r in reports]), f, indent=2)
  if kept:
    with open(os.path.join(workdir, "pseudo_samples.jsonl"), "w") as f:
      f.writelines(json.dumps(s) + "\n" for s in kept)
  samples = [r for r in reports if r.get("samples")]
  if samples:
    with open(os.path.join(workdir, "generated_samples.txt"), "w") as f:
      f.write(_samples_text(samples))
  try:
    from cljax.study import figures as plots  # pylint: disable=import-outside-toplevel
    plots.study_figures(results, workdir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not draw the figures: %s", e)
  logging.info("Wrote %s", os.path.join(workdir, "results.json"))
