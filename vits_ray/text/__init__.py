"""Bangla text front-end: normalisation to speakable text, and the model's character vocabulary."""

from vits_ray.text.normalize import NORMALIZER_VERSION, normalize_text
from vits_ray.text.vocab import BANGLA_CHARACTERS, PUNCTUATIONS, UnsupportedCharactersError, Vocabulary

__all__ = ["BANGLA_CHARACTERS", "NORMALIZER_VERSION", "PUNCTUATIONS", "UnsupportedCharactersError", "Vocabulary", "normalize_text"]
