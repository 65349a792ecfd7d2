"""openelm-mlx: Apple's OpenELM models in MLX."""

from .config import OpenELMConfig
from .errors import OpenELMError
from .model import OpenELM

__all__ = ["OpenELM", "OpenELMConfig", "OpenELMError"]
__version__ = "0.1.0"
