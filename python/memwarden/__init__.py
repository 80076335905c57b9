"""memwarden: keep LLM inference inside its memory.

Importing the package loads the native extension, which registers the tensor ops as
``torch.ops.memwarden.*``. Heavier pieces (transformers, plotting, HTTP) load lazily.
"""
import torch  # noqa: F401  (the extension links against the torch already imported)

from memwarden import _C  # noqa: F401  (registers torch.ops.memwarden)
from memwarden._version import __version__

__all__ = ["__version__"]
