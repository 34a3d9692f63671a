"""The weight cache: quantise a model once into ~/.krasis/cache/<key>/, load it in seconds afterwards."""

from .builder import ensure_cache
from .quant_config import QuantConfig

__all__ = ["QuantConfig", "ensure_cache"]
