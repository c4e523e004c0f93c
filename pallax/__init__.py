"""pallax: a JAX stack for large language models."""

from pallax.api import LLM, Completion, Delta, generate, load, use_compile_cache

__all__ = ["LLM", "Completion", "Delta", "generate", "load", "use_compile_cache"]
__version__ = "0.1.0"
