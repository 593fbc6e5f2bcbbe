"""Models of the kit. ``LongCatVideoTransformer3DModel`` is weight-compatible with the official DiT."""
from .dit import LongCatVideoTransformer3DModel

__all__ = ["LongCatVideoTransformer3DModel"]
