"""cljax: continual learning for language models in JAX."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
  long_description = f.read()

setup(
    name="cljax",
    version="0.1.0",
    description="Continual learning for language models in JAX: a Flax GPT-2 "
                "classifier, pure train steps and forgetting mitigations.",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cljax", "cljax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8.5",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.6",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "datasets>=2.19",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch only for the parity tests and the PyTorch baseline of the benchmark.
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "torch>=2.1"],
    },
)
