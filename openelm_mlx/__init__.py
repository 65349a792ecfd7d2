"""openelm-mlx: Apple's OpenELM models in MLX."""

from .config import OpenELMConfig
from .errors import OpenELMError
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .model import OpenELM

__all__ = ["GenerationResponse", "OpenELM", "OpenELMConfig", "OpenELMError", "generate", "load", "stream_generate"]
__version__ = "0.1.0"
