"""The method interface: a NamedTuple of pure functions over a state pytree.

A continual-learning method is the set of hooks the training loop calls. Every
stateful hook has one signature, ``hook(state, ctx) -> ...``: hooks marked (jit) run
inside the jitted ``train_step``, must be pure and shape-stable, and get a
:class:`StepContext`; hooks marked (host) run between tasks, outside jit, and get a
:class:`TaskContext`.

  init(params) -> state                               (host)
  before_task(state, ctx) -> state                    (host) e.g. generate pseudo-data
  train_arrays(ctx) -> arrays                         (host) the data a task trains on
  prepare_batch(state, ctx) -> batch                  (jit)  e.g. replay mixing
  loss(state, ctx) -> (scalar, aux)                   (jit)  penalties, distillation
  transform_grads(state, ctx) -> grads                (jit)  A-GEM
  proximal(state, ctx) -> params                      (jit)  DEN's L1 step after the update
  after_step(state, ctx) -> state                     (jit)  SI's path, buffer updates
  after_task(state, ctx) -> state                     (host) Fisher, anchors
  adjust_params(state, ctx) -> params                 (host) weight aligning

``adjust_params`` runs after ``after_task`` and returns the params the task ends
with (``ctx.params`` unchanged by default): the evaluation and the next task see them.
``eval_logits(state, ctx) -> (logits, task_logits, sums)`` (optional, jit) replaces
the evaluation forward: ``logits`` for the class-incremental prediction,
``task_logits`` for the task-aware one (the example's task given), ``sums`` extra
per-batch sums the study reports as rates (``task_inference_correct``).

Apart from its hooks, a method declares what it needs of the run
(:class:`Declarations`, ``method.declares``), read once when the run is set up:

  trainable(params, task_index) -> bools | None      which parameters train in a task
  model_options                                      GPT2Config fields it needs
  tokens, answer_marker                              vocabulary it adds; (--head=lm) a
                                                     marker appended to every prompt
  programs(state, ctx) -> [(jitted, args), ...]      what after_task will call

``trainable`` returns a pytree of bools: parameters where it is False are frozen
(their optimizer state is not even allocated) while task ``task_index`` trains.
``model_options`` are the ``GPT2Config`` fields a method needs in the model (LoRA,
adapters: the study adds their parameters, freshly initialized). ``programs`` names
the jitted programs ``after_task`` will call, each with arguments of the shapes and
shardings it will pass (``ctx`` is the after-task context, built before the task's
first step from the params it starts with): the study compiles them in the task's
one compile round, beside the train step, instead of at the task boundary.

``train_arrays`` runs after ``before_task`` and must depend on ``ctx`` only (its
``method_state`` included: the loop calls it again when a run resumes mid-task).
Arrays it adds beside the standard ones (``lm_input_ids``...) reach the jitted hooks
in every batch. A field added to a context never touches the methods that do not
read it.

A method's added ``tokens`` go into the tokenizer and ``wte`` before any data is read,
their ids consecutive from ``BuildContext.first_new_token``; with ``--head=lm``, its
``answer_marker`` is appended to every task's prompt (LAMOL's ``__ans__``). A host
hook may record what it did with ``ctx.report(dict)``: the records go into
``results.json`` (and survive a resume).

Plain fine-tuning is the method with no hooks. Compatible methods compose with
:func:`compose` (``--method=ewc+replay``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol
from collections.abc import Callable

import jax
import jax.numpy as jnp


class StepContext(NamedTuple):
  """What the jitted hooks may use about the current step. Fields a hook cannot
  know yet are None (``logits`` in ``prepare_batch``, ``grads`` in ``loss``)."""
  params: Any = None          # params being differentiated (loss) or before the update
  old_params: Any = None      # after_step: params before the update
  new_params: Any = None      # proximal, after_step: params after the update (after_step:
                              # and after the proximal step)
  grads: Any = None           # transform_grads, after_step: the (transformed) gradient
  batch: Any = None           # the batch (after every prepare_batch)
  logits: Any = None          # loss, after_step: the model's logits on ``batch``
  aux: Any = None             # after_step: this method's aux from ``loss``
  apply_fn: Callable | None = None   # apply_fn(params, batch, deterministic=, rng=) -> logits
  rng: Any = None             # a key for this hook
  # lm_apply_fn(params, input_ids, attention_mask, deterministic=, rng=) -> logits
  # [B, T, vocab]: the same trunk with its tied language-model head
  lm_apply_fn: Callable | None = None


class TaskContext(NamedTuple):
  """What the host hooks may use about the task that starts or just ended."""
  task_index: int = 0
  task_name: str = ""
  train: Any = None           # numpy arrays the task trains on (full, unbatched)
  model: Any = None           # the Flax module
  rng: Any = None             # a key for this hook
  batch_size: int = 8
  params: Any = None          # the params the task starts from (before) or ended at (after)
  previous_train: tuple = ()  # the earlier tasks' own training arrays, in order
  method_state: Any = None    # train_arrays: the state after before_task
  tasks: tuple = ()           # every data.Task of the run, in order (prompts, label words)
  tokenizer: Any = None
  report: Callable = lambda record: None   # report(dict): kept in results.json
  length_buckets: tuple = ()  # the lengths batches may be cut to (data.trim_to_bucket)


# ----------------------------------------------------------------------------
# The hooks' signatures
# ----------------------------------------------------------------------------

class InitFn(Protocol):
  def __call__(self, params: Any) -> Any: ...             # (host) the method's state


class TrainArraysFn(Protocol):
  def __call__(self, ctx: TaskContext) -> dict: ...       # (host) the task's arrays


class HostHook(Protocol):       # before_task, after_task (host) -> the new state
  def __call__(self, state: Any, ctx: TaskContext) -> Any: ...


class AdjustParamsFn(Protocol):
  def __call__(self, state: Any, ctx: TaskContext) -> Any: ...   # (host) -> params


class BatchFn(Protocol):
  def __call__(self, state: Any, ctx: StepContext) -> dict: ...  # (jit) -> batch


class LossFn(Protocol):         # (jit) -> (scalar added to the loss, aux for after_step)
  def __call__(self, state: Any, ctx: StepContext) -> tuple[jax.Array, Any]: ...


class GradsFn(Protocol):
  def __call__(self, state: Any, ctx: StepContext) -> Any: ...   # (jit) -> grads


class ProximalFn(Protocol):
  def __call__(self, state: Any, ctx: StepContext) -> Any: ...   # (jit) -> params


class StepHook(Protocol):
  def __call__(self, state: Any, ctx: StepContext) -> Any: ...   # (jit) -> the new state


class EvalLogitsFn(Protocol):   # (jit) -> (logits, task-aware logits, extra sums)
  def __call__(self, state: Any, ctx: StepContext) -> tuple[jax.Array, jax.Array, dict]: ...


class TrainableFn(Protocol):    # -> bools like params, or None (all train)
  def __call__(self, params: Any, task_index: int) -> Any: ...


class ProgramsFn(Protocol):     # (host) -> [(jitted, args), ...] after_task will call
  def __call__(self, state: Any, ctx: TaskContext) -> list[tuple[Callable, tuple]]: ...


def _no_loss(state, ctx):
  del state, ctx
  return jnp.zeros((), jnp.float32), ()


class Declarations(NamedTuple):
  """What a method needs of the run, read once at its setup (not hooks of the loop)."""
  trainable: TrainableFn | None = None             # None: every parameter trains
  model_options: tuple[tuple[str, Any], ...] = ()   # GPT2Config fields, as pairs
  tokens: tuple[str, ...] = ()     # vocabulary the method adds (ids: see the module doc)
  answer_marker: str = ""          # (--head=lm) appended to every task's prompt
  reads_lm: bool = False           # reads ``lm_apply_fn`` (with a score head too)
  programs: ProgramsFn = lambda state, ctx: []


class Method(NamedTuple):
  """A continual-learning method as pure hooks (every one a no-op by default) and its
  :class:`Declarations`."""
  name: str = "finetune"
  init: InitFn = lambda params: ()
  train_arrays: TrainArraysFn = lambda ctx: ctx.train
  before_task: HostHook = lambda state, ctx: state
  prepare_batch: BatchFn = lambda state, ctx: ctx.batch
  loss: LossFn = _no_loss
  transform_grads: GradsFn = lambda state, ctx: ctx.grads
  proximal: ProximalFn = lambda state, ctx: ctx.new_params
  after_step: StepHook = lambda state, ctx: state
  after_task: HostHook = lambda state, ctx: state
  adjust_params: AdjustParamsFn = lambda state, ctx: ctx.params
  eval_logits: EvalLogitsFn | None = None
  declares: Declarations = Declarations()


def finetune() -> Method:
  """Plain sequential fine-tuning: the catastrophic-forgetting baseline."""
  return Method(name="finetune")


def compose(*methods: Method) -> Method:
  """Runs several methods together; the state is a tuple of their states.

  Training arrays, batches and the task's final params pass through each method's hook
  in order, losses add, gradient transformations chain in order, and each method
  updates its own state (the jitted hooks of method i get ``fold_in(rng, i)``).
  """
  if len(methods) == 1:
    return methods[0]
  _check_composable(methods)
  trainables = [m.declares.trainable for m in methods if m.declares.trainable is not None]
  options = {k: v for m in methods for k, v in m.declares.model_options}

  def init(params):
    return tuple(m.init(params) for m in methods)

  def train_arrays(ctx):
    state = ctx.method_state
    for i, m in enumerate(methods):
      ctx = ctx._replace(train=m.train_arrays(ctx._replace(
          method_state=None if state is None else state[i])))
    return ctx.train

  def before_task(state, ctx):
    return tuple(m.before_task(s, ctx) for m, s in zip(methods, state))

  def loss(state, ctx):
    total, auxes = jnp.zeros((), jnp.float32), []
    for i, (m, s) in enumerate(zip(methods, state)):
      value, aux = m.loss(s, _own(ctx, i))
      total, auxes = total + value, auxes + [aux]
    return total, tuple(auxes)

  def after_step(state, ctx):
    return tuple(m.after_step(s, _own(ctx, i, aux=a))
                 for i, (m, s, a) in enumerate(zip(methods, state, ctx.aux)))

  def after_task(state, ctx):
    return tuple(m.after_task(s, ctx) for m, s in zip(methods, state))

  def adjust_params(state, ctx):
    params = ctx.params
    for m, s in zip(methods, state):
      params = m.adjust_params(s, ctx._replace(params=params))
    return params

  def programs(state, ctx):
    return [p for m, s in zip(methods, state) for p in m.declares.programs(s, ctx)]

  return Method(name="+".join(m.name for m in methods), init=init,
                train_arrays=train_arrays, before_task=before_task,
                prepare_batch=_threaded(methods, "prepare_batch", "batch"), loss=loss,
                transform_grads=_threaded(methods, "transform_grads", "grads"),
                proximal=_threaded(methods, "proximal", "new_params"),
                after_step=after_step, after_task=after_task, adjust_params=adjust_params,
                eval_logits=_own_eval(methods), declares=Declarations(
                    trainable=trainables[0] if trainables else None,
                    model_options=tuple(options.items()),
                    tokens=sum((m.declares.tokens for m in methods), ()),
                    answer_marker="".join(m.declares.answer_marker for m in methods),
                    programs=programs))


def _own(ctx, i, **fields):
  """``ctx`` for method i of a composition: its own key, ``fields`` replaced."""
  rng = None if ctx.rng is None else jax.random.fold_in(ctx.rng, i)
  return ctx._replace(rng=rng, **fields)


def _threaded(methods, hook: str, field: str):
  """A composed jitted hook that passes the context's ``field`` (the batch, the
  gradient, the params) through each method's ``hook`` in order."""
  def run(state, ctx):
    value = getattr(ctx, field)
    for i, (m, s) in enumerate(zip(methods, state)):
      value = getattr(m, hook)(s, _own(ctx, i, **{field: value}))
    return value
  return run


def _check_composable(methods) -> None:
  """One-line errors for methods that cannot run together: each of these kinds of
  hook or declaration may come from one method only."""
  kinds = [("freezing method", lambda m: m.declares.trainable is not None),
           ("method that chooses the evaluation forward (per-task modules)",
            lambda m: m.eval_logits is not None),
           ("method that adds modules to the model (LoRA, adapters, prompts, columns)",
            lambda m: bool(m.declares.model_options)),
           ("method that adds tokens (generative replay, LAMOL)",
            lambda m: bool(m.declares.tokens))]
  for what, has in kinds:
    if sum(has(m) for m in methods) > 1:
      raise ValueError(f"At most one {what} can be composed.")


def _own_eval(methods):
  """The one composed method's ``eval_logits`` over its own part of the state."""
  for i, m in enumerate(methods):
    if m.eval_logits is not None:
      return lambda state, ctx, i=i, m=m: m.eval_logits(state[i], ctx)
  return None
