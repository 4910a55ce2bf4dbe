"""Continual-learning methods as pure functions on the interface of ``cljax.train.method``
(``Method``: pure hooks and their declarations).

Every module of this folder is imported here, and importing a module registers its
methods (``registry.register``): adding a method is adding one file.
"""

import importlib
import pkgutil

from cljax.methods.registry import BuildContext, MethodConfig, build, hparam, names, register
from cljax.train.method import (Declarations, Method, StepContext, TaskContext, compose,
                                finetune)

__all__ = ["BuildContext", "Declarations", "Method", "MethodConfig", "StepContext", "TaskContext",
           "build", "compose", "finetune", "hparam", "names", "register"]

for _module in pkgutil.iter_modules(__path__):
  if _module.name != "registry":
    importlib.import_module(f"{__name__}.{_module.name}")
