"""Learning without Forgetting (Li and Hoiem 2016).

Before each task after the first, the current params become a frozen teacher. While
training, the student's logits on the new task's inputs are distilled towards the
teacher's on the classes of the previous tasks, with temperature T:
``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.
(DER and DER++, which replay stored logits, live in ``replay.py``.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax.methods.registry import BuildContext, hparam, register
from cljax.options import NON_NEGATIVE, POSITIVE
from cljax.train.method import Method, StepContext, TaskContext


class LwFState(NamedTuple):
  teacher: Any              # params of the model before the current task
  old_classes: jax.Array    # [C] bool: classes of the previous tasks
  active: jax.Array         # float32 scalar


def distillation_loss(student_logits, teacher_logits, class_mask, weights, temperature):
  """Mean over weighted examples of ``T^2 KL(p_teacher || p_student)`` restricted to
  ``class_mask``, both at temperature ``T``."""
  neg = jnp.finfo(jnp.float32).min
  s = jnp.where(class_mask, student_logits / temperature, neg)
  t = jnp.where(class_mask, teacher_logits / temperature, neg)
  log_ps, log_pt = jax.nn.log_softmax(s), jax.nn.log_softmax(t)
  kl = jnp.sum(jnp.where(class_mask, jnp.exp(log_pt) * (log_pt - log_ps), 0.0), axis=-1)
  return temperature ** 2 * jnp.sum(weights * kl) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True)
class LwFConfig:
  lwf_alpha: float = hparam(1.0, "LwF weight of the distillation term.",
                             bound=NON_NEGATIVE)
  lwf_temperature: float = hparam(2.0, "LwF distillation temperature.",
                                   bound=POSITIVE)


@register("lwf", "LwF: distillation from the model before the current task (Li and "
          "Hoiem 2016)", LwFConfig, grid={"lwf_alpha": (1.0, 10.0)},
          traced=("lwf_alpha",))
def lwf(hp: LwFConfig, ctx: BuildContext) -> Method:
  def init(params):
    return LwFState(jax.tree.map(jnp.copy, params), jnp.zeros((ctx.num_labels,), bool),
                    jnp.zeros((), jnp.float32))

  def before_task(state: LwFState, tctx: TaskContext):
    if tctx.task_index == 0:
      return state
    # The teacher is the model as it is now; old_classes were set after each task.
    return LwFState(jax.tree.map(jnp.copy, tctx.params), state.old_classes,
                    jnp.ones((), jnp.float32))

  def after_task(state: LwFState, tctx: TaskContext):
    classes = np.asarray(tctx.train["class_mask"]).any(axis=0)
    return state._replace(old_classes=jnp.asarray(np.asarray(state.old_classes) | classes))

  def loss(state: LwFState, sctx: StepContext):
    teacher = jax.lax.stop_gradient(sctx.apply_fn(state.teacher, sctx.batch,
                                                  deterministic=True))
    value = distillation_loss(sctx.logits, teacher, state.old_classes[None],
                              sctx.batch["weights"], hp.lwf_temperature)
    return hp.lwf_alpha * value * state.active, ()

  return Method(name="lwf", init=init, before_task=before_task, loss=loss,
                after_task=after_task)
