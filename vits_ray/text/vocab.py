"""The model's character vocabulary, id-for-id identical to Coqui's `TTSTokenizer`.

Exported models are loaded by Coqui's `Synthesizer`, which rebuilds its tokenizer from the
`CharactersConfig` we write; so the ids here follow Coqui's layout exactly:
`[pad, eos, bos, blank, *sorted(characters), *punctuations]`, with a blank between every
token when `add_blank`. Unlike Coqui's tokenizer, which drops unknown characters with a log
line, `encode` refuses them: a silently shortened sentence trains the model on wrong labels.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _bangla_characters() -> str:
    chars = [chr(c) for c in range(0x0980, 0x0A00) if unicodedata.category(chr(c)) != "Cn"]
    excluded = (
        "০১২৩৪৫৬৭৮৯"        # digits are spelled out by the normaliser
        "ঀঌৡৠঽ"             # legacy letters: Sanskrit-only, not written in modern Bangla
        "ৢৣৄৗ"              # vocalic L/RR signs; the AU length mark only occurs inside ৌ
        "\u09bc"            # nukta: য় ড় ঢ় are normalised to their precomposed letters
        "ৰৱ"                # Assamese ra and wa
        "৲৳৴৵৶৷৸৹৺৻ৼ৽৾"     # currency, fractions, Vedic/other-language signs; ৳ is spelled out
    )
    # ZWJ is kept by the normaliser only in র‍্য ("র‍্যাব"), where it changes the pronunciation.
    return "".join(sorted([c for c in chars if c not in excluded] + ["\u200d"]))


BANGLA_CHARACTERS = _bangla_characters()
# Coqui's own default punctuation set also carries the word separator, so the space lives here.
PUNCTUATIONS = "।,.?!-;:'\" "

_FORMAT_VERSION = 1
_GRAPHEMES_CLASS = "TTS.tts.utils.text.characters.Graphemes"


def _char_name(char: str) -> str:
    return unicodedata.name(char, f"U+{ord(char):04X}")


class UnsupportedCharactersError(ValueError):
    """Text holds characters that have no token; `problems` lists (position, char, name)."""

    def __init__(self, text: str, problems: list[tuple[int, str, str]], where: str = ""):
        self.text = text
        self.problems = problems
        shown = ", ".join(f"{char!r} {name} at {pos}" for pos, char, name in problems[:20])
        more = f" and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{where}{len(problems)} character(s) not in the vocabulary: {shown}{more}; in {text!r}")


@dataclass(frozen=True)
class Vocabulary:
    characters: str
    punctuations: str
    add_blank: bool = True
    pad: str = "<PAD>"
    eos: str = "<EOS>"
    bos: str = "<BOS>"
    blank: str = "<BLNK>"
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if list(self.characters) != sorted(set(self.characters)):
            raise ValueError("vocabulary characters must be sorted and unique (Coqui sorts them)")
        if len(set(self.punctuations)) != len(self.punctuations):
            raise ValueError(f"duplicate punctuation in {self.punctuations!r}")
        if set(self.characters) & set(self.punctuations):
            raise ValueError(f"characters and punctuations overlap: {set(self.characters) & set(self.punctuations)}")
        specials = [self.pad, self.eos, self.bos, self.blank]
        # An empty symbol would silently disappear from Coqui's vocabulary and shift every id.
        if any(len(s) < 2 for s in specials) or len(set(specials)) != 4:
            raise ValueError(f"pad/eos/bos/blank must be distinct multi-character symbols, got {specials}")
        object.__setattr__(self, "_ids", {tok: i for i, tok in enumerate(self.tokens)})

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def full_bangla(cls, extra: str = "", add_blank: bool = True) -> Vocabulary:
        """Every character that normalised Bangladeshi Bangla can contain, plus `extra`."""
        letters = set(BANGLA_CHARACTERS) | (set(extra) - set(PUNCTUATIONS))
        return cls("".join(sorted(letters)), PUNCTUATIONS, add_blank=add_blank)

    @classmethod
    def build(cls, texts: Iterable[str], allowed: Vocabulary | None = None, add_blank: bool = True) -> Vocabulary:
        """The characters actually used in `texts` (already normalised), all of them in `allowed`.

        Only used characters get a token: an id the model never saw in training would embed
        to noise at inference, so unseen characters should fail in `encode` instead.
        """
        allowed = allowed if allowed is not None else cls.full_bangla()
        used: set[str] = set()
        for i, text in enumerate(texts):
            problems = allowed.unsupported(text)
            if problems:
                raise UnsupportedCharactersError(text, problems, where=f"text {i}: ")
            used.update(text)
        if not used:
            raise ValueError("cannot build a vocabulary from no text")
        return cls(
            characters="".join(sorted(used & set(allowed.characters))),
            punctuations="".join(p for p in allowed.punctuations if p in used),
            add_blank=add_blank,
            pad=allowed.pad, eos=allowed.eos, bos=allowed.bos, blank=allowed.blank,
        )

    # --- tokens ---------------------------------------------------------------------------

    @property
    def tokens(self) -> list[str]:
        return [self.pad, self.eos, self.bos, self.blank, *self.characters, *self.punctuations]

    @property
    def num_tokens(self) -> int:
        """Coqui's `num_chars` for a model using this vocabulary."""
        return 4 + len(self.characters) + len(self.punctuations)

    @property
    def pad_id(self) -> int:
        return self._ids[self.pad]

    @property
    def blank_id(self) -> int:
        return self._ids[self.blank]

    def unsupported(self, text: str) -> list[tuple[int, str, str]]:
        """(position, character, Unicode name) for every character without a token."""
        # the special symbols are multi-character, so no single character can hit them
        return [(i, c, _char_name(c)) for i, c in enumerate(text) if c not in self._ids]

    def encode(self, text: str) -> list[int]:
        """Token ids, as Coqui's `TTSTokenizer.text_to_ids` gives them; never drops a character."""
        problems = self.unsupported(text)
        if problems:
            raise UnsupportedCharactersError(text, problems)
        ids = [self._ids[c] for c in text]
        if not self.add_blank:
            return ids
        out = [self.blank_id] * (2 * len(ids) + 1)
        out[1::2] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; the special tokens (blank, pad, eos, bos) are skipped."""
        tokens = self.tokens
        out = []
        for i in ids:
            if not 0 <= i < len(tokens):
                raise ValueError(f"token id {i} out of range for a vocabulary of {len(tokens)}")
            if i >= 4:
                out.append(tokens[i])
        return "".join(out)

    # --- Coqui ----------------------------------------------------------------------------

    def coqui_characters_config(self):
        """The `CharactersConfig` that makes Coqui build exactly these ids.

        EOS/BOS symbols are part of the id layout but not used: the model config must keep
        `enable_eos_bos_chars=False`, `use_phonemes=False`, `text_cleaner=None` and
        `add_blank=self.add_blank` (see `coqui_tokenizer`).
        """
        from TTS.tts.configs.shared_configs import CharactersConfig

        return CharactersConfig(
            characters_class=_GRAPHEMES_CLASS,
            characters=self.characters,
            punctuations=self.punctuations,
            pad=self.pad, eos=self.eos, bos=self.bos, blank=self.blank,
            is_unique=True, is_sorted=True,
        )

    def coqui_tokenizer(self):
        """Coqui's own tokenizer for this vocabulary, built the way Coqui's `Vits` builds it."""
        from TTS.tts.configs.vits_config import VitsConfig
        from TTS.tts.utils.text.tokenizer import TTSTokenizer

        config = VitsConfig(characters=self.coqui_characters_config(), add_blank=self.add_blank,
                            use_phonemes=False, text_cleaner=None, enable_eos_bos_chars=False)
        tokenizer, _ = TTSTokenizer.init_from_config(config)
        return tokenizer

    # --- files ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "characters": self.characters, "punctuations": self.punctuations, "add_blank": self.add_blank,
            "pad": self.pad, "eos": self.eos, "bos": self.bos, "blank": self.blank,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unknown vocabulary format_version {version!r} (expected {_FORMAT_VERSION})")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"bad vocabulary fields: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically: a reader never sees half a file."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
