"""`vits-ray synth`: sentences in, 16-bit WAVs and their real-time factors out.

Every line is prepared (normalised, encoded) before any audio is made, so a line the model cannot
speak fails the command at once, naming its line number and characters, instead of after minutes
of synthesis. Timing starts after one untimed warm-up pass (the first call pays for allocations and
kernel selection), and the thread count is stated with the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vits_ray.data.audio import to_pcm16
from vits_ray.voice import PreparedText, Scales, Voice, VoiceError

SUMMARY_FILE = "synth.json"


@dataclass
class SpokenLine:
    line: int  # 1-based line of the input (or position among --text arguments)
    file: str
    text: str
    normalized: str
    dropped: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    synth_seconds: float = 0.0

    @property
    def rtf(self) -> float:
        return self.synth_seconds / self.audio_seconds if self.audio_seconds else float("inf")


@dataclass
class SynthSummary:
    out_dir: str
    voice: dict[str, Any]
    scales: dict[str, float]
    lines: list[SpokenLine]
    warnings: list[str]

    @property
    def rtf(self) -> float:
        audio = sum(s.audio_seconds for s in self.lines)
        return sum(s.synth_seconds for s in self.lines) / audio if audio else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "voice": self.voice, "scales": self.scales, "rtf": self.rtf,
                "rtf_note": "synthesis seconds per second of audio, after one untimed warm-up, "
                            f"{self.voice['threads']} thread(s)",
                "warnings": self.warnings, "lines": [{**asdict(s), "rtf": s.rtf} for s in self.lines]}


def read_text_file(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every non-blank line."""
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise VoiceError(f"{path}: not UTF-8 text ({err})") from None
    return [(i, line.strip()) for i, line in enumerate(content.splitlines(), start=1) if line.strip()]


def prepare_all(voice: Voice, lines: list[tuple[int, str]], drop_unsupported: bool,
                origin: str) -> list[tuple[int, PreparedText]]:
    if not lines:
        raise VoiceError(f"{origin}: no text to speak")
    return [(number, voice.prepare(text, drop_unsupported, where=f"{origin} line {number}: "))
            for number, text in lines]


def speak_lines(voice: Voice, lines: list[tuple[int, str]], out_dir: Path, scales: Scales = Scales(),
                drop_unsupported: bool = False, seed: int = 0, origin: str = "--text") -> SynthSummary:
    """Speak `lines` into `out_dir`/0001.wav, ... and `out_dir`/synth.json."""
    import soundfile as sf
    import torch

    prepared = prepare_all(voice, lines, drop_unsupported, origin)
    out_dir.mkdir(parents=True, exist_ok=True)
    voice.synthesize(prepared[0][1].token_ids, scales)  # warm-up, untimed
    spoken = []
    for index, (number, text) in enumerate(prepared, start=1):
        torch.manual_seed(seed + index)  # the torch backend's noise; ONNX Runtime's cannot be seeded
        started = time.perf_counter()
        audio = voice.synthesize(text.token_ids, scales)
        elapsed = time.perf_counter() - started
        name = f"{index:04d}.wav"
        sf.write(out_dir / name, to_pcm16(audio), voice.sample_rate, subtype="PCM_16")
        spoken.append(SpokenLine(line=number, file=name, text=text.text, normalized=text.normalized,
                                 dropped=[f"{c!r} {n} at {p}" for p, c, n in text.dropped],
                                 audio_seconds=len(audio) / voice.sample_rate, synth_seconds=elapsed))
    summary = SynthSummary(out_dir=str(out_dir), voice=voice.describe(), scales=asdict(scales), lines=spoken,
                           warnings=list(voice.warnings))
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    return summary


def format_summary(summary: SynthSummary) -> str:
    lines = [f"{s.file}: {s.audio_seconds:.2f} s, RTF {s.rtf:.3f}  {s.normalized}"
             + (f"  (dropped: {', '.join(s.dropped)})" if s.dropped else "") for s in summary.lines]
    voice = summary.voice
    lines.append(f"{len(summary.lines)} file(s) in {summary.out_dir} at {voice['sample_rate']} Hz, 16-bit; "
                 f"real-time factor {summary.rtf:.3f} ({voice['backend']}, {voice['threads']} thread(s), "
                 f"after a warm-up)")
    return "\n".join(lines)
