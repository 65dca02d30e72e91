"""Colocated baseline: vision tower and language model in one model instance, no transfer."""
from .service import MonolithicOutput, MonolithicService

__all__ = ["MonolithicOutput", "MonolithicService"]
