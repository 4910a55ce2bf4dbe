"""Figures of a study: accuracy matrices and per-task accuracy through the run."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def accuracy_matrix_axes(ax, matrix, tasks, title):
  m = np.asarray(matrix, dtype=float)
  im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
  ax.set_xticks(range(len(tasks)), tasks)
  ax.set_yticks(range(m.shape[0]), [f"after {t}" for t in tasks[:m.shape[0]]])
  ax.set_xlabel("evaluated on")
  ax.set_title(title)
  for i in range(m.shape[0]):
    for j in range(m.shape[1]):
      ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center",
              color="white" if m[i, j] < 0.6 else "black")
  return im


def study_figures(results: dict, workdir: str) -> list[str]:
  """Writes accuracy_matrix.png and accuracy_curve.png; returns their paths."""
  tasks = results["tasks"]
  paths = []
  fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(tasks), 2 + 1.2 * len(tasks)))
  accuracy_matrix_axes(axes[0], results["accuracy_matrix"], tasks,
                       "class-incremental (all classes)")
  im = accuracy_matrix_axes(axes[1], results["task_aware_accuracy_matrix"], tasks,
                            "task-aware (task's classes)")
  fig.colorbar(im, ax=axes, fraction=0.03)
  fig.suptitle(f"{results['method']} (seed {results['seed']}): accuracy after each task")
  paths.append(os.path.join(workdir, "accuracy_matrix.png"))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)

  curve = results["curve"]
  steps = [c["global_step"] for c in curve]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, title in ((axes[0], "accuracy", "class-incremental"),
                         (axes[1], "task_aware_accuracy", "task-aware")):
    for j, name in enumerate(tasks):
      ax.plot(steps, [c[key][j] for c in curve], marker="o", label=name)
    for boundary in np.cumsum(results["timing"]["steps_per_task"]):
      ax.axvline(boundary, color="gray", ls=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  axes[1].legend()
  fig.suptitle(f"{results['method']}: accuracy on each task through the run "
               "(dotted: task boundaries)")
  paths.append(os.path.join(workdir, "accuracy_curve.png"))
  fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths
