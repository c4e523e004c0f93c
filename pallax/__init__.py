"""pallax: a JAX stack for large language models."""

from pallax.api import LLM, Completion, Delta, generate, load

__all__ = ["LLM", "Completion", "Delta", "generate", "load"]
__version__ = "0.1.0"
