"""The floor a user lifts into their own loop, one job per module:

- ``method.py``: the method interface (:class:`Method`, its contexts, ``compose``).
- ``losses.py``: the losses steps and methods share, as sums.
- ``optim.py``: AdamW with the Hugging Face Trainer's defaults, and its options.
- ``steps.py``: the train state and the pure train / eval steps (classification, LM).
- ``compile.py``: programs compiled ahead in parallel; sums added on the device.
- ``tasks.py``: the task protocol (``begin_task``, ``end_task``) around a method.
- ``loop.py``: the one step loop with its periodic work, epochs of batches.
- ``run.py``: a run's life: its options, workdir guards, logger, restore-or-start.
- ``checkpoint.py``: orbax save (in the background) and restore, never a non-finite one.
- ``progress.py``: step logging, divergence, JSON Lines and TensorBoard writers.
- ``sharding.py``: device meshes and shardings, single- or multi-host; runs side by side.

``cljax.steps`` gathers what a user's loop needs from here in one namespace. Nothing
here imports from the methods, the study, LM training, reports or the programs.
"""
