"""Visual encoders (CLIP, the DiffLMM diffusion encoder, the fused encoder) and their registry.

Importing the package registers every built-in encoder, so ``encoders.base.build_encoder`` can find any of
them by the name a config gives.
"""

from encoders import (
    clip,  # noqa: F401  (registers "clip")
    diffusion,  # noqa: F401  (registers "diffusion")
    fused,  # noqa: F401  (registers "fused")
)
from encoders.base import ENCODERS, VisualEncoder, build_encoder, encoder_class, register_encoder

__all__ = ["ENCODERS", "VisualEncoder", "build_encoder", "encoder_class", "register_encoder"]
