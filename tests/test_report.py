"""Sweep bookkeeping (resume, strength selection) and report aggregation."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cljax import metrics, report
from cljax import study
from cljax.methods import MethodConfig
from cljax.report import tables as report_tables
from cljax.study import stages, sweep


def fake_results(method, seed, matrix, ta_matrix=None, val_avg=0.5, strength=None,
                 train_seconds=10.0):
  ta_matrix = ta_matrix or matrix
  from cljax.metrics import summarize
  hp = MethodConfig()
  if strength:
    hp = MethodConfig(**{strength[0]: strength[1]})
  return {"tasks": ["imdb", "ag_news"], "method": method, "seed": seed,
          "accuracy_matrix": matrix, "task_aware_accuracy_matrix": ta_matrix,
          "metrics": summarize(matrix, baseline=[0.5, 0.5]),
          "task_aware_metrics": summarize(ta_matrix, baseline=[0.5, 0.5]),
          "val_metrics": {"average_accuracy": val_avg},
          "method_config": {"ewc_lambda": hp.ewc_lambda},
          "timing": {"train_seconds": train_seconds, "steps_per_task": [4, 4]},
          "curve": [{"global_step": 0, "accuracy": [0.5, 0.5]},
                    {"global_step": 4, "accuracy": matrix[0]},
                    {"global_step": 8, "accuracy": matrix[1]}],
          "model": {"source": "random:tiny", "n_layer": 2, "n_embd": 64},
          "data": {}, "environment": {"devices": ["cpu"]}}


# The base the fake runs record (model.source random:tiny).
BASE = study.StudyConfig(init="random", size="tiny")

T_975_2 = 4.302652729911275    # Student's t, 97.5th percentile, 2 degrees of freedom
T_975_1 = 12.706204736174698   # and 1 degree of freedom


def test_mean_std_and_the_95_percent_interval_by_hand():
  assert metrics.mean_std([0.5, 0.7, 0.9]) == pytest.approx(
      (0.7, 0.2, 3, T_975_2 * 0.2 / np.sqrt(3)))
  mean, std, n, half = metrics.mean_std([0.4, None])
  assert (mean, std, n) == (0.4, 0.0, 1) and np.isnan(half)
  assert metrics.mean_std([None])[2] == 0


def test_aggregate_groups_seeds_and_keeps_the_selected_strength():
  results = [
      dict(fake_results("finetune", 0, [[0.9, 0.0], [0.1, 0.8]]), tag="default"),
      dict(fake_results("finetune", 1, [[0.8, 0.0], [0.3, 0.9]]), tag="default"),
      dict(fake_results("finetune", 2, [[0.7, 0.0], [0.2, 1.0]]), tag="default"),
      dict(fake_results("ewc", 0, [[0.9, 0.0], [0.5, 0.6]]), tag="ewc_lambda=100"),
      dict(fake_results("ewc", 0, [[0.9, 0.0], [0.0, 0.9]]), tag="ewc_lambda=1"),
  ]
  rows = report.aggregate(results, {"ewc": {"tag": "ewc_lambda=100"}})
  by = {r["method"]: r for r in rows}
  ft = by["finetune"]
  assert ft["n"] == 3 and ft["seeds"] == [0, 1, 2]
  # average accuracy per seed: 0.45, 0.6, 0.6
  std = np.std([0.45, 0.6, 0.6], ddof=1)
  assert ft["average_accuracy"][:3] == pytest.approx((0.55, std, 3))
  assert ft["average_accuracy"][3] == pytest.approx(T_975_2 * std / np.sqrt(3))
  # forgetting per seed: 0.8, 0.5, 0.5
  assert ft["forgetting"][0] == pytest.approx(0.6)
  assert ft["task0_after_1"][0] == pytest.approx(0.2)
  assert by["ewc"]["strength"] == "ewc_lambda=100" and by["ewc"]["n"] == 1
  assert by["ewc"]["average_accuracy"][:3] == pytest.approx((0.55, 0.0, 1))
  table = report.markdown_table(rows, ["imdb", "ag_news"])
  # 4.3027 * 0.0866 / sqrt(3) and 4.3027 * 0.1732 / sqrt(3)
  assert "| finetune | default | 3 | 0.550 ± 0.215 | 0.600 ± 0.430 |" in table
  assert ft["generation_seconds"][2] == 0 and table.split("\n")[2].endswith("| - |")


def test_the_generation_cost_of_generative_methods_is_a_column():
  r = fake_results("lamol", 0, [[0.9, 0.0], [0.5, 0.8]])
  r["method_reports"] = [{"task": 1, "generation_seconds": 3.0},
                         {"task": 2, "generation_seconds": 4.5}]
  (row,) = report.aggregate([dict(r, tag="default")], {})
  assert row["generation_seconds"][0] == pytest.approx(7.5)
  assert report.markdown_table([row], ["imdb", "ag_news"]).endswith("| 7.5 | - | - | - |")


def test_task_inference_and_the_model_size_are_columns():
  r = fake_results("lora_per_task", 0, [[0.9, 0.0], [0.5, 0.8]])
  r["task_inference_accuracy_matrix"] = [[1.0, 0.0], [0.75, 0.95]]
  r["model"] = {"trainable_parameters_per_task": [2000, 3500],
                "train_state_bytes_per_task": [2 ** 21, 2 ** 21]}
  (row,) = report.aggregate([dict(r, tag="default")], {})
  assert row["task_inference"][0] == pytest.approx(0.85)    # after the last task
  assert row["trainable_k"][0] == pytest.approx(3.5) and row["state_mb"][0] == 2.0
  assert report.markdown_table([row], ["imdb", "ag_news"]).endswith("| 0.850 | 3.5 | 2.0 |")


def test_sweep_resumes_and_selects_strength_on_validation(tmp_path, monkeypatch):
  """An interrupted sweep reruns only what is missing; the strength with the best
  validation accuracy (not test) is chosen on the first seed."""
  calls = []
  # Validation favours lambda=1, test favours lambda=100: the sweep must follow val.
  val = {1.0: 0.8, 100.0: 0.6}
  test_matrix = {1.0: [[0.9, 0.0], [0.1, 0.8]], 100.0: [[0.9, 0.0], [0.6, 0.8]]}

  def fake_run(cfg, workdir, *, resume=False, flags=None):
    calls.append((cfg.method, cfg.method_config.ewc_lambda, cfg.seed, resume))
    if len(calls) == 3 and not os.path.exists(tmp_path / "crashed"):
      os.makedirs(tmp_path / "crashed")
      os.makedirs(os.path.join(workdir, "checkpoints"))
      raise KeyboardInterrupt
    lam = cfg.method_config.ewc_lambda
    r = fake_results(cfg.method, cfg.seed, test_matrix.get(lam, [[0.9, 0.0], [0.0, 0.9]]),
                     val_avg=val.get(lam, 0.5))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(r, f)
    return r

  monkeypatch.setattr(stages, "run", fake_run)
  base = BASE.replace(num_val=10)
  args = (base, str(tmp_path / "sweep"), ["finetune", "ewc"], [0, 1],
          {"ewc": ("ewc_lambda", [1.0, 100.0])})
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(*args)
  assert calls == [("finetune", 1e4, 0, False), ("finetune", 1e4, 1, False),
                   ("ewc", 1.0, 0, False)]
  calls.clear()
  out = sweep.run_sweep(*args)
  # finetune's runs are done; ewc lambda=1 resumes from its checkpoints.
  assert calls == [("ewc", 1.0, 0, True), ("ewc", 100.0, 0, False), ("ewc", 1.0, 1, False)]
  assert out["selection"]["ewc"]["chosen"] == 1.0
  calls.clear()
  sweep.run_sweep(*args)
  assert calls == []  # everything done
  rows = report.write_report(str(tmp_path / "sweep"))["rows"]
  assert {(r["method"], r["strength"], r["n"]) for r in rows} == {
      ("finetune", "default", 2), ("ewc", "ewc_lambda=1", 2)}
  assert os.path.exists(tmp_path / "sweep" / "report.csv")
  assert os.path.exists(tmp_path / "sweep" / "report_strength.png")


def _fake_sweep_run(calls, val=None):
  def fake_run(cfg, workdir, *, resume=False, flags=None):
    calls.append((cfg.tasks, cfg.method, cfg.method_config.ewc_lambda, cfg.seed))
    r = fake_results(cfg.method, cfg.seed, [[0.9, 0.0], [0.1 * (cfg.seed + 1), 0.8]],
                     val_avg=(val or {}).get(cfg.method_config.ewc_lambda, 0.5))
    r["tasks"] = list(cfg.tasks)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(r, f)
    return r
  return fake_run


def test_strengths_chosen_on_a_seed_that_is_not_reported(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stages, "run", _fake_sweep_run(calls, {1.0: 0.8, 100.0: 0.6}))
  root = str(tmp_path / "sweep")
  out = sweep.run_sweep(BASE.replace(num_val=10), root, ["ewc"], [0, 1],
                        {"ewc": ("ewc_lambda", [1.0, 100.0])}, selection_seed=7)
  assert [c[2:] for c in calls] == [(1.0, 7), (100.0, 7), (1.0, 0), (1.0, 1)]
  assert out["selection"]["ewc"]["seed"] == 7 and out["selection"]["ewc"]["held_out_seed"]
  (row,) = report.write_report(root)["rows"]
  assert row["seeds"] == [0, 1] and row["strength"] == "ewc_lambda=1"
  assert "on seed 7, not reported" in open(os.path.join(root, "report.md")).read()
  with pytest.raises(ValueError, match="--selection_seed=0 is among --seeds"):
    sweep.run_sweep(BASE.replace(num_val=10), root, ["ewc"], [0, 1], selection_seed=0)


def test_a_sweep_over_task_orders_reports_each_order_and_all(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(stages, "run", _fake_sweep_run(calls))
  root = str(tmp_path / "orders")
  orders = [("imdb", "ag_news"), ("ag_news", "imdb")]
  sweep.run_orders(BASE, root, orders, methods=["finetune"], seeds=[0, 1])
  assert [c[0] for c in calls] == [orders[0]] * 2 + [orders[1]] * 2
  assert os.path.exists(os.path.join(root, "order2", "finetune", "default", "seed1",
                                     "results.json"))
  out = report.write_report(root)
  text = open(os.path.join(root, "report.md")).read()
  assert "## Order 1: imdb -> ag_news" in text and "## Order 2: ag_news -> imdb" in text
  # Over the orders: 4 runs, average accuracy (0.9 + 0.1 (seed + 1) ... ) by hand.
  avg = [(0.1 * (s + 1) + 0.8) / 2 for s in (0, 1)] * 2
  line = next(x for x in text.splitlines() if x.startswith("| finetune | default | 4 |"))
  half = 3.182446305284263 * np.std(avg, ddof=1) / 2     # t(0.975, 3)
  assert f"{np.mean(avg):.3f} ± {half:.3f}" in line
  first = [0.1 * (s + 1) for s in (0, 1)] * 2          # the first task after the last
  half = 3.182446305284263 * np.std(first, ddof=1) / 2
  assert line.endswith(f"| {np.mean(first):.3f} ± {half:.3f} | 0.800 ± 0.000 | "   # last
                       f"{np.mean(avg):.3f} ± {3.182446305284263 * np.std(avg, ddof=1) / 2:.3f} |")
  assert len(out["rows"]) == 2 and os.path.exists(os.path.join(root, "report_order2.csv"))
  assert os.path.exists(os.path.join(root, "report_matrices_order1.png"))
  with pytest.raises(ValueError, match="holds a sweep over the orders"):
    sweep.run_orders(BASE, root, orders[::-1], methods=["finetune"], seeds=[0])
  # The first order alone (one more seed of it) leaves the root's orders as they were.
  calls.clear()
  sweep.run_orders(BASE, root, orders[:1], methods=["finetune"], seeds=[2])
  assert [c[0] for c in calls] == [orders[0]]
  assert json.load(open(os.path.join(root, "orders.json"))) == [list(o) for o in orders]


def test_a_sweep_stops_in_one_line_where_its_root_holds_runs_of_another_base(tmp_path,
                                                                          monkeypatch):
  """A finished run in the root that started from other weights (another SHA-256, or
  none recorded) stops the sweep before any run; the same weights fill the root."""
  calls = []
  monkeypatch.setattr(stages, "run", _fake_sweep_run(calls))
  folder = tmp_path / "base"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  (folder / "model.safetensors").write_bytes(b"the base's weights")
  sha = hashlib.sha256(b"the base's weights").hexdigest()
  base = study.StudyConfig(init="pretrained", model=str(folder))
  root = tmp_path / "root"
  done = root / "finetune" / "default" / "seed0"
  done.mkdir(parents=True)
  for recorded, why in ((None, "records no base SHA-256"),
                        ("ab" * 32, "started from weights SHA-256 abababababab")):
    (done / "results.json").write_text(json.dumps(dict(
        fake_results("finetune", 0, [[0.9, 0.1], [0.2, 0.8]]),
        model={"source": str(folder), "source_sha256": recorded})))
    with pytest.raises(ValueError, match=f"^{done} {why}.*, not from --model={folder} "
                                         f"\\(SHA-256 {sha[:12]}\\): sweep into another --root"):
      sweep.run_sweep(base, str(root), ["finetune"], [0, 1])
    assert not calls
  (done / "results.json").write_text(json.dumps(dict(
      fake_results("finetune", 0, [[0.9, 0.1], [0.2, 0.8]]),
      model={"source": str(folder), "source_sha256": sha})))
  sweep.run_sweep(base, str(root), ["finetune"], [0, 1])
  assert [c[3] for c in calls] == [1]   # seed 0 read as done, seed 1 run


def test_grid_parsing_errors():
  assert sweep.parse_grid(["ewc:ewc_lambda=1e2,1e4"]) == {"ewc": ("ewc_lambda", [100.0,
                                                                              10000.0])}
  assert sweep.parse_grid(["replay:replay_size=50,100"])["replay"][1] == [50, 100]
  with pytest.raises(ValueError, match="not a method hyperparameter"):
    sweep.parse_grid(["ewc:lambda=1"])
  with pytest.raises(ValueError, match="METHOD:FIELD"):
    sweep.parse_grid(["ewc"])


def test_method_lists_and_grids_come_from_the_registry():
  from cljax.methods import registry
  assert sweep.expand_methods(["all"]) == registry.names()
  assert "lamol" not in sweep.expand_methods(["all"], "score")   # text-only
  assert "lamol" in sweep.expand_methods(["all"], "lm")
  assert sweep.expand_methods(["ewc", "all"])[0] == "ewc"
  assert sweep.default_grids(["ewc", "replay", "ewc+replay", "si"]) == {
      "ewc": ("ewc_lambda", [1e2, 1e4, 1e6]), "si": ("si_c", [0.1, 10.0])}
  assert sweep.parse_grid(["ewc:ewc_lambda=1,2", "agem:replay_size=5"]) == {
      "ewc": ("ewc_lambda", [1.0, 2.0]), "agem": ("replay_size", [5])}


def test_differences_to_finetune_are_paired_by_order_and_seed_by_hand():
  def row(method, runs):
    return {"method": method, "strength": "default", "runs": [
        fake_results(method, seed, [[0.9, 0.0], [first, 0.8]]) | {"tasks": list(tasks)}
        for tasks, seed, first in runs]}
  ab, ba = ("a", "b"), ("b", "a")
  finetune = [(ab, 0, 0.0), (ab, 1, 0.1), (ba, 0, 0.2), (ba, 1, 0.0)]
  # EWC shares (ab, 0), (ab, 1), (ba, 0); seed 5 of ba has no fine-tuning run to pair.
  ewc = [(ab, 0, 0.2), (ab, 1, 0.2), (ba, 0, 0.6), (ba, 5, 0.9)]
  lines = report_tables.paired_differences([[row("finetune", finetune[:2]),
                                             row("ewc", ewc[:2])],
                                            [row("finetune", finetune[2:]),
                                             row("ewc", ewc[2:])]])
  (line, per_order) = [x for x in lines if x.startswith("| ewc |")]
  first = np.array([0.2, 0.1, 0.4])        # the first task after the last, minus finetune's
  half = T_975_2 * first.std(ddof=1) / np.sqrt(3)
  cells = line.split(" | ")
  assert cells[1] == "3"
  assert cells[5] == f"{first.mean():.3f} ± {half:.3f}"            # first task final
  assert cells[2] == f"{first.mean() / 2:.3f} ± {half / 2:.3f}"    # avg acc: half of it
  assert cells[3] == f"{-first.mean():.3f} ± {half:.3f}"           # forgetting: 0.9 - first
  assert cells[6] == "0.000 ± 0.000"                                # last task final
  assert not [x for x in lines if x.startswith("| finetune |")]
  # In each order alone: order ab has two pairs (avg acc +0.1, +0.05), ba one (+0.2).
  half_ab = T_975_1 * np.std([0.1, 0.05], ddof=1) / np.sqrt(2)
  assert per_order == f"| ewc | 0.075 ± {half_ab:.3f} (2) | 0.200 (1) |"
  assert report_tables.paired_differences([[row("ewc", ewc)]]) == []


def test_the_units_table_averages_each_tasks_den_report_by_hand():
  def run(selected, added, params):
    return {"method": "den", "tasks": ["a", "b"], "method_reports": [
        {"task": 0, "units_selected": [4, 4], "units_in_use": [8],
         "parameters_in_use": [1000]},
        {"task": 1, "units_selected": selected, "units_added": added, "units_pruned": [0, 1],
         "units_split": [1, 0], "units_in_use": [8, 8 + sum(added) - 1],
         "parameters_in_use": [1000, params]}]}
  lines = report_tables.growth_lines([run([1, 2], [2, 2], 3000), run([3, 4], [0, 0], 1000),
                                      {"method": "finetune", "tasks": ["a", "b"]}])
  rows = [line for line in lines if line.startswith("| den")]
  assert rows[0] == ("| den | a | 2 | 1.0 ± 0.0 | 8.0 ± 0.0 | 8.0 ± 0.0 | 0.0 ± 0.0 "
                     "| 0.0 ± 0.0 | 0.0 ± 0.0 |")
  # task b: parameters 3.0 and 1.0 k: mean 2.0, sample std 1.414, t(0.975, 1) = 12.706
  # -> half-width 12.706 * 1.414 / sqrt(2) = 12.7; units in use 11 and 7; selected 3, 7.
  assert rows[1] == ("| den | b | 2 | 2.0 ± 12.7 | 9.0 ± 25.4 | 5.0 ± 25.4 | 2.0 ± 25.4 "
                     "| 1.0 ± 0.0 | 1.0 ± 0.0 |")
  assert report_tables.growth_lines([{"method": "finetune", "tasks": ["a"]}]) == []


def test_keep_copies_what_the_report_reads_and_no_checkpoint(tmp_path):
  run = tmp_path / "sweep" / "order1" / "ewc" / "default" / "seed0"
  (run / "checkpoints" / "10").mkdir(parents=True)
  (run / "checkpoints" / "10" / "state").write_text("weights")
  for name, text in [("results.json", '{"model": {"source_sha256": "aa"}}'),
                     ("pseudo_samples.jsonl", "{}\n"), ("run.flags", "--seed=0\n"),
                     ("metrics.jsonl", "{}\n")]:
    (run / name).write_text(text)
  (tmp_path / "sweep" / "orders.json").write_text("[]")
  (tmp_path / "sweep" / "order1" / "selection.json").write_text("{}")
  assert report.keep_results(str(tmp_path / "sweep"), str(tmp_path / "kept")) == 1
  kept = sorted(str(p.relative_to(tmp_path / "kept")) for p in (tmp_path / "kept").rglob("*")
                if p.is_file())
  assert kept == ["order1/ewc/default/seed0/pseudo_samples.jsonl",
                  "order1/ewc/default/seed0/results.json", "order1/ewc/default/seed0/run.flags",
                  "order1/selection.json", "orders.json"]
  # Runs of another base are not kept beside them: one table would mix two bases.
  (run / "results.json").write_text('{"model": {"source_sha256": "bb"}}')
  with pytest.raises(ValueError, match=r"kept holds runs from base weights \['aa'\] and .* "
                                       r"none of them \(\['bb'\]\): keep into another"):
    report.keep_results(str(tmp_path / "sweep"), str(tmp_path / "kept"))
  assert "aa" in (tmp_path / "kept" / "order1/ewc/default/seed0/results.json").read_text()


def test_a_report_over_two_roots_names_the_ablation_and_pairs_with_it(tmp_path):
  """A method swept again into a second root with one setting changed is its own row,
  named by that setting, and other methods pair with it by order and seed."""
  def write(root, method, seed, first, lam):
    r = fake_results(method, seed, [[0.9, 0.0], [first, 0.8]], strength=("ewc_lambda", lam))
    folder = tmp_path / root / method / "default" / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(r))
  for seed, first in enumerate([0.0, 0.1, 0.2]):
    write("main", "finetune", seed, first, 1e4)
    write("main", "ewc", seed, first + 0.3, 1e4)
  for seed, first in enumerate([0.1, 0.1, 0.4]):
    write("ablation", "ewc", seed, first, 0.0)
  roots = [str(tmp_path / "main"), str(tmp_path / "ablation")]
  out = report.write_report(roots, str(tmp_path / "both"),
                            paired_with=["finetune", "ewc (ewc_lambda=0)"])
  assert sorted((r["method"], r["n"]) for r in out["rows"]) == [
      ("ewc", 3), ("ewc (ewc_lambda=0)", 3), ("finetune", 3)]
  text = (tmp_path / "both" / "report.md").read_text()
  assert "## Against ewc (ewc_lambda=0), paired" in text
  # ewc minus its ablation, first task after the last: 0.2, 0.3, 0.1 by seed.
  d = np.array([0.2, 0.3, 0.1])
  section = text[text.index("## Against ewc (ewc_lambda=0)"):]
  line = next(x for x in section.splitlines() if x.startswith("| ewc |"))
  assert line.split(" | ")[5] == f"{d.mean():.3f} ± {T_975_2 * d.std(ddof=1) / np.sqrt(3):.3f}"
  # The same from the command line; a report over two roots needs --outdir.
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "report.py")
  cmd = [sys.executable, script, f"--root={roots[0]}", f"--root={roots[1]}"]
  done = subprocess.run(cmd + ["--paired_with=ewc (ewc_lambda=0)"], capture_output=True,
                        text=True, check=False)
  assert done.returncode != 0 and "say where their report goes with --outdir" in done.stderr
  done = subprocess.run(cmd + ["--paired_with=finetune", "--paired_with=ewc (ewc_lambda=0)",
                               f"--outdir={tmp_path / 'cli'}"], capture_output=True, text=True,
                        check=True)
  assert (tmp_path / "cli" / "report.md").read_text() == text
  with pytest.raises(ValueError, match=r"Cannot pair with ewc \(gamma=0\): no such method"):
    report.write_report(roots, str(tmp_path / "x"), paired_with=["ewc (gamma=0)"])
  with pytest.raises(ValueError, match="No results.json found under .*nothing"):
    report.write_report([roots[0], str(tmp_path / "nothing")], str(tmp_path / "x"))


def test_the_report_names_the_base_the_runs_started_from():
  """The header gives the base's weights SHA-256 as the runs recorded it, and says so
  where runs started from different bases (a report over sweeps of two sessions)."""
  runs = [fake_results("finetune", s, [[0.9, 0.0], [0.1, 0.8]]) for s in range(3)]
  assert report.runs._model_text(runs) == "Model random:tiny (2 layers, width 64)"
  same = [dict(r, model=dict(r["model"], source_sha256="ab" * 32)) for r in runs]
  assert report.runs._model_text(same) == ("Model random:tiny (2 layers, width 64), weights "
                                      "SHA-256 " + "ab" * 32)
  assert report.runs._model_text(same[:1] + runs[1:]).endswith(
      "from more than one base (weights SHA-256: not recorded in 2 runs, abababababab in "
      "1 run)")


def test_a_report_of_some_seeds_keeps_the_runs_a_strength_was_chosen_on(tmp_path):
  """--seeds reports only those seeds; the held-out seed a strength was chosen on
  still draws the strength figure; a seed no run has is an error."""
  def write(method, tag, seed, first, lam=None):
    r = fake_results(method, seed, [[0.9, 0.0], [first, 0.8]],
                     strength=("ewc_lambda", lam) if lam else None)
    folder = tmp_path / "sweep" / method / tag / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(r))
  for seed, first in enumerate([0.0, 0.1, 0.2, 0.6, 0.6]):
    write("finetune", "default", seed, first)
  for lam, first in [(1.0, 0.1), (100.0, 0.3)]:
    write("ewc", f"ewc_lambda={lam:g}", 100, first, lam)
  for seed in range(5):
    write("ewc", "ewc_lambda=100", seed, 0.4, 100.0)
  (tmp_path / "sweep" / "selection.json").write_text(json.dumps({"ewc": {
      "field": "ewc_lambda", "chosen": 100.0, "chosen_on": "validation average accuracy",
      "seed": 100, "held_out_seed": True, "tag": "ewc_lambda=100", "candidates": [
          {"value": 1.0, "val_average_accuracy": 0.2},
          {"value": 100.0, "val_average_accuracy": 0.3}]}}))
  root = str(tmp_path / "sweep")
  every = report.write_report(root, str(tmp_path / "every"))
  some = report.write_report(root, str(tmp_path / "some"), seeds=[0, 1, 2])
  assert sorted((r["method"], r["seeds"]) for r in every["rows"]) == [
      ("ewc", [0, 1, 2, 3, 4]), ("finetune", [0, 1, 2, 3, 4])]
  assert sorted((r["method"], r["seeds"]) for r in some["rows"]) == [
      ("ewc", [0, 1, 2]), ("finetune", [0, 1, 2])]
  ft = next(r for r in some["rows"] if r["method"] == "finetune")
  assert ft["average_accuracy"][0] == pytest.approx(0.45)   # (first + 0.8) / 2 over seeds 0-2
  assert "Only seeds 0, 1, 2 are reported here." in some["markdown"]
  assert "![report_strength.png](report_strength.png)" in some["figures"]
  with pytest.raises(ValueError, match=r"No run of seed \[7\] under .*the seeds there are "
                                       r"\[0, 1, 2, 3, 4, 100\]"):
    report.write_report(root, str(tmp_path / "x"), seeds=[0, 7])
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "report.py")
  done = subprocess.run([sys.executable, script, f"--root={root}", "--seeds=0,one"],
                        capture_output=True, text=True, check=False)
  assert done.returncode != 0 and "--seeds=0,one: expected whole numbers" in done.stderr


def test_a_strength_candidate_that_diverges_is_not_chosen(tmp_path, monkeypatch):
  """A candidate whose loss goes non-finite is logged and kept in selection.json as
  diverged, the best finite one is chosen and the sweep goes on; if every candidate
  diverges the sweep stops with a one-line error."""
  calls = []
  finite = _fake_sweep_run(calls, {1.0: 0.6, 100.0: 0.8, 1e4: 0.9})

  def fake_run(cfg, workdir, *, resume=False, flags=None):
    if cfg.method_config.ewc_lambda >= bad[0]:
      calls.append(("diverged", cfg.method_config.ewc_lambda))
      raise FloatingPointError("Non-finite loss or gradient at task 1 (b), step 3")
    return finite(cfg, workdir, resume=resume, flags=flags)
  bad = [1e4]
  monkeypatch.setattr(stages, "run", fake_run)
  root = str(tmp_path / "sweep")
  grid = {"ewc": ("ewc_lambda", [1.0, 100.0, 1e4])}
  out = sweep.run_sweep(BASE.replace(num_val=10), root, ["ewc"], [0], grid,
                        selection_seed=7)
  sel = out["selection"]["ewc"]
  assert sel["chosen"] == 100.0        # 1e4 would have scored 0.9 had it not diverged
  assert [c["val_average_accuracy"] for c in sel["candidates"]] == [0.6, 0.8, None]
  assert "step 3" in sel["candidates"][2]["diverged"]
  assert [c[-1] if c[0] != "diverged" else c for c in calls] == [7, 7, ("diverged", 1e4), 0]
  assert out["results"][2] is None and len(out["runs"]) == 4
  text = report.write_report(root)["markdown"]
  assert "candidates 1: 0.600, 100: 0.800, 10000: diverged)" in text
  bad[0] = 0.0
  with pytest.raises(ValueError, match=r"Every ewc candidate diverged \(ewc_lambda 1, 100, "
                                       r"10000\): lower --learning_rate"):
    sweep.run_sweep(BASE.replace(num_val=10), str(tmp_path / "all"), ["ewc"], [0], grid,
                    selection_seed=7)


def test_a_report_over_two_families_names_the_second_by_its_family(tmp_path):
  """The same methods swept on another model family into a second root: its rows are
  named by the family (results.json's model.family), not by the root's path."""
  for root, family in (("a", "gpt2"), ("b", "llama")):
    for seed in range(2):
      r = fake_results("finetune", seed, [[0.9, 0.0], [0.1, 0.8]])
      r["model"] = {**r.get("model", {}), "family": family}
      folder = tmp_path / root / "finetune" / "default" / f"seed{seed}"
      folder.mkdir(parents=True)
      (folder / "results.json").write_text(json.dumps(r))
  out = report.write_report([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "both"))
  assert sorted(r["method"] for r in out["rows"]) == ["finetune", "finetune (llama)"]
