"""cljax: continual learning for language models in JAX."""

from cljax import data, metrics, steps
from cljax.models import GPT2LM, GPT2Classifier, GPT2Config
from cljax.models.generation import generate
from cljax.models.hf import load_lm, load_pretrained, load_tokenizer, save_pretrained

__version__ = "0.1.0"
__all__ = ["GPT2LM", "GPT2Classifier", "GPT2Config", "data", "generate", "load_lm",
           "load_pretrained", "load_tokenizer", "metrics", "save_pretrained", "steps"]
