"""Language side (receiver): EMBED_REFs -> pull (loader threads) -> the language engine -> text."""

from .loader import PullLoader
from .service import LanguageService

__all__ = ["LanguageService", "PullLoader"]
