"""Benchmarks: ``throughput.py`` (the train step and the same step in PyTorch, a step's
profile, the Fisher pass, generation), ``overhead.py`` (the loop against a bare loop,
the compile against a minimal GPT-2, a boundary checkpoint's blocking) and
``baselines.py`` (a PyTorch loop and the seed's Trainer script over the whole study)."""
