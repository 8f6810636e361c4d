"""The generator as ONNX, with a parity check against PyTorch before anything is written.

Coqui's own `Vits.export_onnx` does the export (inference path only, weight norm folded, opset 18,
the TorchScript exporter: the dynamo one cannot trace VITS's data-dependent lengths). The traced
graph fixes some branches at trace time (relative attention pads only inputs longer than its
window), so parity is checked on sentences of several lengths, a two-word one included.

With all noise scales at 0 both runtimes are deterministic. A sentence passes when the two lengths
agree (a one-hop difference, from a duration rounded the other way, is tolerated and reported)
and the common part agrees within `MAX_ABS_TOLERANCE` (full scale is 1.0) with an SNR of at least
`MIN_SNR_DB`. The file lands at its destination only when every sentence passes, so a failed
export never replaces a good one. What a consumer needs to speak with it (sample rate, vocabulary,
normaliser version, the inputs) is in the file's own metadata and in a sidecar `OUT.onnx.json`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vits_ray.voice import DETERMINISTIC, META_PREFIX, ONNX_SIDECAR_SUFFIX, OnnxVoice, TorchVoice, VoiceError

MAX_ABS_TOLERANCE = 1e-3
MIN_SNR_DB = 40.0
PARITY_SENTENCES = (
    "শুভ সকাল!",
    "আমি ভালো আছি, ধন্যবাদ।",
    "আমার ১২৩ টাকা লাগবে, কাল সকাল ১০টায় দেখা হবে।",
    "বাংলাদেশের মানুষ নদীর দেশে বাস করে, আর বর্ষাকালে এখানকার গ্রামগুলো সবুজে ভরে ওঠে।",
)
INPUTS_DOC = ("input: int64 [batch, tokens] (vits_ray.text.normalize_text, then the vocabulary's ids with a blank "
              "between tokens when add_blank); input_lengths: int64 [batch]; scales: float32 [3] = (noise, length, "
              "noise_dp); output: float32 [batch, 1, samples]")


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree; nothing was written."""


@dataclass(frozen=True)
class ParityCase:
    text: str
    tokens: int
    samples_torch: int
    samples_onnx: int
    max_abs: float
    snr_db: float
    passed: bool


@dataclass(frozen=True)
class ParityReport:
    cases: list[ParityCase]
    hop_length: int
    max_abs_tolerance: float = MAX_ABS_TOLERANCE
    min_snr_db: float = MIN_SNR_DB

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def format_text(self) -> str:
        lines = [f"ONNX parity ({'passed' if self.passed else 'FAILED'}): noise scales 0, tolerance max-abs "
                 f"<= {self.max_abs_tolerance:g} and SNR >= {self.min_snr_db:g} dB, lengths equal or one hop "
                 f"({self.hop_length} samples) apart"]
        for c in self.cases:
            length = (f"{c.samples_torch} samples" if c.samples_torch == c.samples_onnx
                      else f"LENGTH torch {c.samples_torch} / onnx {c.samples_onnx}")
            lines.append(f"  {'ok  ' if c.passed else 'FAIL'} {c.tokens:>4} tokens, {length}, max-abs {c.max_abs:.2e}, "
                         f"SNR {c.snr_db:.1f} dB: {c.text}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "hop_length": self.hop_length, "max_abs_tolerance": self.max_abs_tolerance,
                "min_snr_db": self.min_snr_db, "noise_scales": [0.0, 1.0, 0.0],
                "cases": [{**asdict(c), "snr_db": c.snr_db if math.isfinite(c.snr_db) else "inf"} for c in self.cases]}


@dataclass(frozen=True)
class OnnxExport:
    uri: str
    sidecar_uri: str
    parity: ParityReport
    export_seconds: float
    size_bytes: int


def compare(text: str, tokens: int, reference: np.ndarray, candidate: np.ndarray, hop_length: int) -> ParityCase:
    common = min(len(reference), len(candidate))
    diff = reference[:common].astype(np.float64) - candidate[:common].astype(np.float64)
    max_abs = float(np.abs(diff).max()) if common else math.inf
    noise = float(np.sum(diff ** 2))
    signal = float(np.sum(reference[:common].astype(np.float64) ** 2))
    snr_db = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    passed = (abs(len(reference) - len(candidate)) <= hop_length and common > 0
              and max_abs <= MAX_ABS_TOLERANCE and snr_db >= MIN_SNR_DB)
    return ParityCase(text, tokens, len(reference), len(candidate), max_abs, snr_db, passed)


def check_parity(torch_voice: TorchVoice, onnx_voice: OnnxVoice,
                 sentences: tuple[str, ...] = PARITY_SENTENCES) -> ParityReport:
    """Both runtimes on each sentence with all noise at 0. Characters the model lacks are left out
    (a corpus vocabulary may not hold every letter of these sentences): the graph is what is tested."""
    cases = []
    for text in sentences:
        try:
            prepared = torch_voice.prepare(text, drop_unsupported=True)
        except VoiceError:
            continue  # not one character of it in this vocabulary
        reference = torch_voice.synthesize(prepared.token_ids, DETERMINISTIC)
        candidate = onnx_voice.synthesize(prepared.token_ids, DETERMINISTIC)
        cases.append(compare(prepared.normalized, len(prepared.token_ids), reference, candidate,
                             torch_voice.hop_length))
    return ParityReport(cases, torch_voice.hop_length)


def onnx_metadata(voice: TorchVoice) -> dict[str, str]:
    return {
        META_PREFIX + "sample_rate": str(voice.sample_rate),
        META_PREFIX + "vocabulary": json.dumps(voice.vocab.to_dict(), ensure_ascii=False, sort_keys=True),
        META_PREFIX + "normalizer_version": str(voice.normalizer_version),
        META_PREFIX + "step": "" if voice.step is None else str(voice.step),
        META_PREFIX + "hop_length": str(voice.hop_length),
        META_PREFIX + "inputs": INPUTS_DOC,
        META_PREFIX + "default_scales": json.dumps([0.667, 1.0, 1.0]),
        META_PREFIX + "text_preparation": "vits_ray.text.normalize_text, then the vocabulary; `vits-ray synth` does both",
    }


def _write_with_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "vits-ray (Coqui Vits.export_onnx)"
    onnx.save(model, str(path))


def export_onnx(voice: TorchVoice, out_uri: str, storage_cfg=None,
                sentences: tuple[str, ...] = PARITY_SENTENCES) -> OnnxExport:
    """Export `voice`'s generator to `out_uri` (a local path or s3://.../NAME.onnx) and its sidecar
    `out_uri + ".json"`. Raises ParityError (writing nothing) when ONNX Runtime disagrees with PyTorch."""
    from vits_ray.storage import open_store

    if not out_uri.endswith(".onnx"):
        raise VoiceError(f"--onnx {out_uri}: the output must be a .onnx file name")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vits-ray-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():  # the tracer's notes on every length-dependent branch (see above)
            warnings.simplefilter("ignore")
            voice.model.export_onnx(str(path), verbose=False)
        metadata = onnx_metadata(voice)
        _write_with_metadata(path, metadata)
        exported = time.perf_counter() - started
        parity = check_parity(voice, OnnxVoice.from_file(path, threads=voice.threads), sentences)
        if not parity.passed:
            raise ParityError(f"the ONNX export of {voice.source} does not match PyTorch; nothing was written.\n"
                              + parity.format_text())
        sidecar = {**{k[len(META_PREFIX):]: v for k, v in metadata.items()},
                   "vocabulary": voice.vocab.to_dict(), "source": voice.source, "parity": parity.to_dict(),
                   "opset": 18, "exporter": "torch.onnx TorchScript (dynamo=False) via Coqui Vits.export_onnx"}
        (Path(tmp) / "sidecar.json").write_text(json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        folder, _, name = out_uri.rpartition("/")
        store = open_store(folder or ".", storage_cfg)
        store.upload_file(path, name)
        store.upload_file(Path(tmp) / "sidecar.json", name + ONNX_SIDECAR_SUFFIX)
        size = path.stat().st_size
    return OnnxExport(uri=store.url(name), sidecar_uri=store.url(name + ONNX_SIDECAR_SUFFIX), parity=parity,
                      export_seconds=exported, size_bytes=size)


def as_onnx_voice(voice: TorchVoice) -> OnnxVoice:
    """`voice` exported (parity-checked) to a temporary file and loaded in ONNX Runtime; the session
    holds the model, so the file goes at once."""
    with tempfile.TemporaryDirectory(prefix="vits-ray-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(voice, str(path))
        return OnnxVoice.from_file(path, f"{voice.source} (exported to ONNX now)", voice.threads)
