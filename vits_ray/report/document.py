"""The document model shared by the reports: a list of blocks (headings, paragraphs, tables,
figures, audio samples), rendered twice, as markdown and as HTML, so both say the same thing.

report.html inlines its PNGs (base64) but not audio: sample WAVs are linked, relative to the
document, from the `samples/` folder the report copies them into.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union
from urllib.parse import quote

from vits_ray.report.quality import Sample, SampleFile


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class SampleTable:
    """Reference and synthesised recordings side by side: links in markdown, players in HTML."""

    samples: list[Sample]


Block = Union[Heading, Para, Bullets, Table, Image, SampleTable]


def fmt(x: Optional[float], digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.{digits}e}"
    return f"{x:.{digits}f}"


# --- rendering ---------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return " ".join(text.split("\n")).replace("|", "\\|")


def _md_sample(f: Optional[SampleFile]) -> str:
    if f is None:
        return "–"
    if f.copied is None:
        return f.problem
    return f"[{Path(f.copied).name}]({quote(f.copied)})"


def _html_sample(f: Optional[SampleFile]) -> str:
    if f is None:
        return "–"
    if f.copied is None:
        return html.escape(f.problem)
    src = html.escape(quote(f.copied))
    return (f'<audio controls preload="none" src="{src}"></audio><br>'
            f'<a href="{src}">{html.escape(Path(f.copied).name)}</a>')


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {i}" for i in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(map(_md_cell, b.headers)) + " |",
                     "|" + "|".join("---" for _ in b.headers) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.path.name})")
        elif isinstance(b, SampleTable):
            rows = [[s.id, s.text, _md_sample(s.reference), _md_sample(s.synthesized)] for s in b.samples]
            out.append(to_markdown([Table(["id", "text", "reference", "synthesised"], rows)]).rstrip("\n"))
    return "\n\n".join(out) + "\n"


def _html_inline(text: str) -> str:
    # Only `code` spans are used in the text.
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: Sequence[Block], title: str) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
        elif isinstance(b, SampleTable):
            rows = "".join(f'<tr><td>{html.escape(s.id)}</td><td class="text">{html.escape(s.text)}</td>'
                           f"<td>{_html_sample(s.reference)}</td><td>{_html_sample(s.synthesized)}</td></tr>"
                           for s in b.samples)
            body.append("<table><thead><tr><th>id</th><th>text</th><th>reference</th><th>synthesised</th></tr>"
                        f"</thead><tbody>{rows}</tbody></table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td.text{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
             "code{background:#f3f3f3}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x
