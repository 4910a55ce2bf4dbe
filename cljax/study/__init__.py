"""The sequential study: train on each task in turn, evaluate every task after each.

One job per module:

- ``config.py``: :class:`StudyConfig`, every setting of a run, each a flag.
- ``setup.py``: what a run builds once (:class:`Study`), its progress record
  (:class:`RunRecord`), its workdir's guards.
- ``stages.py``: the stages over explicit state (:func:`start`, then per task
  :func:`start_task`, :func:`train_task`, :func:`finish_task`) and :func:`run`.
- ``evaluation.py``: every task's test (or validation) split, as :class:`Scores`.
- ``results.py`` and ``figures.py``: ``results.json`` and a run's figures.
- ``parallel.py``: runs of one study side by side, as one vmapped step.
- ``sweep.py``: methods x seeds x strengths x task orders, strengths chosen on
  validation data.

``cljax.study.run(config, workdir)`` is the library call behind ``cljax-forgetting``.
"""

from cljax.study.config import StudyConfig
from cljax.study.evaluation import Scores, evaluate_all
from cljax.study.setup import (OUTPUTS, RESUMABLE_CHANGES, RunRecord, Study, TaskRecord,
                               resume_view, setup)
from cljax.study.stages import (TaskHooks, finish_task, run, start, start_task, task_hooks,
                                train_task)
from cljax.train.progress import Interrupted
from cljax.train.tasks import TaskPlan

__all__ = ["OUTPUTS", "RESUMABLE_CHANGES", "Interrupted", "RunRecord", "Scores", "Study",
           "StudyConfig", "TaskHooks", "TaskPlan", "TaskRecord", "evaluate_all", "finish_task",
           "resume_view", "run", "setup", "start", "start_task", "task_hooks", "train_task"]
