"""Continual-learning methods as pure functions (see ``base.Method``)."""

from cljax.methods.base import Method, TaskContext, compose, finetune
from cljax.methods.registry import BuildContext, MethodConfig, build, names

# Importing the method modules registers them.
from cljax.methods import distill, projection, regularizers, replay  # noqa: E402,F401
