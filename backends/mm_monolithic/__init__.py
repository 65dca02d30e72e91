"""Colocated baseline: vision tower and language model in one model instance, no transfer, the same engine."""

from .service import MonolithicService, VisionLoader

__all__ = ["MonolithicService", "VisionLoader"]
