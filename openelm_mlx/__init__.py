"""openelm-mlx: Apple's OpenELM models in MLX."""

from .config import OpenELMConfig
from .engine import batch_generate, stream_batch_generate
from .errors import OpenELMError
from .generate import GenerationResponse, generate, stream_generate
from .loading import load
from .model import OpenELM

__all__ = [
    "GenerationResponse",
    "OpenELM",
    "OpenELMConfig",
    "OpenELMError",
    "batch_generate",
    "generate",
    "load",
    "stream_batch_generate",
    "stream_generate",
]
__version__ = "0.1.0"
