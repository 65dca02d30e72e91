"""Language side (receiver): EMBED_REFs -> pull -> language model -> text."""
from .service import GenerateOutput, LanguageService

__all__ = ["GenerateOutput", "LanguageService"]
