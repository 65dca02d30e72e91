"""Encoder side (sender): images -> vision tower -> block pool -> EMBED_REF."""

from .service import EncoderService

__all__ = ["EncoderService"]
