"""Corpus layouts. A reader turns a corpus folder into raw records, one per transcript line.

Adding a format is one function `read_x(input_dir) -> Iterator[RawRecord | Rejection]` and one
entry in `FORMATS`. Readers only parse: audio and text are validated later, in `ingest`.
A line that cannot be parsed becomes a `malformed_line` rejection naming its line number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator


@dataclass(frozen=True)
class RawRecord:
    id: str
    text: str
    audio_path: Path
    speaker: str
    line: int  # 1-based line number in the transcript file


@dataclass(frozen=True)
class Rejection:
    id: str
    reason: str
    detail: str
    line: int = 0  # source line, to report rejections in transcript order


    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}


# An id becomes a file name and a shard key: no path separators, no leading dot, no control chars.
_ID_RE = re.compile(r"^[^/\\\x00-\x1f.][^/\\\x00-\x1f]*$")


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each non-blank line; text is None where it is not valid UTF-8."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a corpus folder of the expected format?")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


def _malformed(file: str, number: int, detail: str, first_field: str = "") -> Rejection:
    ident = first_field if first_field and _ID_RE.match(first_field) else f"{file}:{number}"
    return Rejection(ident, "malformed_line", f"{file} line {number}: {detail}", number)


def read_ljspeech(input_dir: Path) -> Iterator[RawRecord | Rejection]:
    """`metadata.csv` with `id|text[|normalized_text]`, audio in `wavs/<id>.wav`, one speaker.

    The raw `text` column is used; we normalise it ourselves rather than trust column 3.
    """
    for number, line in _lines(input_dir / "metadata.csv"):
        if line is None:
            yield _malformed("metadata.csv", number, "not valid UTF-8")
            continue
        fields = line.split("|")
        ident = fields[0].strip()
        if len(fields) not in (2, 3):
            yield _malformed("metadata.csv", number,
                             f"expected 'id|text[|normalized_text]', got {len(fields)} field(s)",
                             ident if len(fields) > 1 else "")
        elif not _ID_RE.match(ident):
            yield _malformed("metadata.csv", number, f"bad id {ident!r}")
        else:
            yield RawRecord(ident, fields[1], input_dir / "wavs" / f"{ident}.wav", "ljspeech", number)


def read_slr37(input_dir: Path) -> Iterator[RawRecord | Rejection]:
    """OpenSLR SLR37 (Bangla): `line_index.tsv` with `<file_id>\\t<text>`, audio in `wavs/<file_id>.wav`.

    The speaker is the file id's prefix before the first `_`. An empty field between id and text
    (`id\\t\\ttext`, seen in some OpenSLR releases) is tolerated.
    """
    for number, line in _lines(input_dir / "line_index.tsv"):
        if line is None:
            yield _malformed("line_index.tsv", number, "not valid UTF-8")
            continue
        fields = line.split("\t")
        ident = fields[0].strip()
        rest = [f for f in fields[1:] if f.strip()] if len(fields) > 2 else fields[1:]
        if len(rest) != 1:
            yield _malformed("line_index.tsv", number,
                             f"expected '<file_id>\\t<text>', got {len(fields)} tab-separated field(s)",
                             ident if len(fields) > 1 else "")
        elif not _ID_RE.match(ident):
            yield _malformed("line_index.tsv", number, f"bad id {ident!r}")
        else:
            speaker = ident.split("_", 1)[0]
            yield RawRecord(ident, rest[0], input_dir / "wavs" / f"{ident}.wav", speaker, number)


FORMATS: dict[str, Callable[[Path], Iterator[RawRecord | Rejection]]] = {
    "ljspeech": read_ljspeech,
    "slr37": read_slr37,
}


def read_corpus(input_dir: Path, fmt: str) -> Iterator[RawRecord | Rejection]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown corpus format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")
    if not input_dir.is_dir():
        raise FileNotFoundError(f"corpus folder {input_dir} not found")
    return FORMATS[fmt](input_dir)
