"""Command-line entry points (``cljax-forgetting``, ``cljax-sweep``, ...).

Each module defines its own absl flags and a ``main(argv)``; ``experiments/*.py`` and
the console scripts both run it. Kept apart because their flags differ (the
benchmark's ``--batch_size`` is not the study's).
"""

import sys

from absl import app
from absl import flags as absl_flags
from absl import logging
import jax

# What bad input raises (a flag value, a file, a folder, a diverged run): the programs
# log it as one line and exit with status 1.
BAD_INPUT = (ValueError, TypeError, OSError, FloatingPointError)


def checked(argv, run):
  """The body a program's ``main`` shares: no positional arguments, INFO logging, and
  ``run()``'s bad input (:data:`BAD_INPUT`) as one log line and exit status 1."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # The dropout masks' layout, set explicitly so that no JAX version or environment
  # changes what a run computes (the library checks it where it draws masks).
  jax.config.update("jax_threefry_partitionable", True)
  try:
    return run()
  except BAD_INPUT as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


def run_main(main, module) -> None:
  """``app.run(main)``, with ``--help`` listing ``module``'s flags (absl lists the key
  flags of ``sys.argv[0]``: the console script or experiments/*.py)."""
  main_module = sys.modules["__main__"]
  if not main_module.__doc__:   # a console script's wrapper: show the command's usage
    main_module.__doc__ = module.__doc__
  for flag in absl_flags.FLAGS.get_key_flags_for_module(module):
    absl_flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)
