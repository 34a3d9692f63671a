"""Krasis: run huge Mixture-of-Experts LLMs on one consumer GPU plus system RAM."""

from .errors import InvalidInputError, KrasisError, ModelLoadError, UnsupportedArchitectureError
from .llm import LLM

__all__ = ["LLM", "KrasisError", "ModelLoadError", "UnsupportedArchitectureError", "InvalidInputError"]
__version__ = "0.1.0"
