"""``cljax.steps``: the floor a user lifts into their own loop, in one namespace.

The pure train and eval steps and their train state (:mod:`cljax.train.steps`), the
optimizer (:mod:`cljax.train.optim`), the losses steps and methods share
(:mod:`cljax.train.losses`) and the compile-ahead helpers
(:mod:`cljax.train.compile`), re-exported under the names the docs use::

    from cljax import steps
    tx, _ = steps.make_optimizer(total_steps=100)
    state = steps.init_train_state(params, tx, jax.random.key(0))
    step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx), donate_argnums=0)
"""

from cljax.train.compile import accumulate, compile_ahead, compile_programs, tree_add
from cljax.train.losses import (Batch, classification_objective, cross_entropy,
                                lm_cross_entropy, next_token_losses, next_token_objective)
from cljax.train.optim import decay_mask, host_learning_rate, linear_warmup_decay, make_optimizer
from cljax.train.steps import (TrainState, dropout_key, eval_step, forward, init_train_state,
                               lm_eval_step, lm_train_step, logits_step, train_step)

__all__ = ["Batch", "TrainState", "accumulate", "classification_objective", "compile_ahead",
           "compile_programs", "cross_entropy", "decay_mask", "dropout_key", "eval_step",
           "forward", "host_learning_rate", "init_train_state", "linear_warmup_decay",
           "lm_cross_entropy", "lm_eval_step", "lm_train_step", "logits_step",
           "make_optimizer", "next_token_losses", "next_token_objective", "tree_add",
           "train_step"]
