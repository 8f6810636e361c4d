"""A trained voice, ready to speak: Bangla text through the training front-end, audio out of PyTorch
or ONNX Runtime.

    voice = load_voice("runs/bn-ft")                 # a run (its export/), an export folder,
    voice = load_voice("s3://b/bn/model.onnx")        # or an .onnx file written by `vits-ray export`
    text = voice.prepare("আমার ১২৩ টাকা")              # normalised, encoded; refuses unknown characters
    audio = voice.synthesize(text.token_ids)          # float32 mono at voice.sample_rate

Text is prepared exactly as `prepare` prepared the training text (`normalize_text`, then the model's
own vocabulary), so numerals are spoken, and a character the model has no token for is an error
naming it, unless the caller asks for it to be dropped (then it is listed, never silently lost).
Loading reads tensors and plain data only (`checkpoint.safe_load`) and builds the generator alone:
the discriminator is half the reference model and inference never uses it.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vits_ray.model import EXPORT_FILES
from vits_ray.text import NORMALIZER_VERSION, UnsupportedCharactersError, Vocabulary, normalize_text

if TYPE_CHECKING:
    from TTS.tts.models.vits import Vits

EXPORT_DIR = "export"
ONNX_SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
# Keys of the ONNX file's own metadata (a lone .onnx file is enough to speak with).
META_PREFIX = "vits_ray."


class VoiceError(ValueError):
    """The model cannot be loaded, or the text cannot be spoken; the message names the file or text."""


@dataclass(frozen=True)
class Scales:
    """Coqui's inference knobs: latent noise, duration scale (> 1 speaks slower) and the stochastic
    duration predictor's noise. Defaults are Coqui's; all noise 0 makes synthesis deterministic."""

    noise: float = 0.667
    length: float = 1.0
    noise_dp: float = 1.0

    @staticmethod
    def for_speed(speed: float = 1.0, noise: float = 0.667, noise_dp: float = 1.0) -> "Scales":
        if speed <= 0:
            raise VoiceError(f"--speed must be positive, got {speed}")
        return Scales(noise=noise, length=1.0 / speed, noise_dp=noise_dp)

    def as_array(self) -> np.ndarray:
        return np.array([self.noise, self.length, self.noise_dp], dtype=np.float32)


DETERMINISTIC = Scales(noise=0.0, length=1.0, noise_dp=0.0)


@dataclass(frozen=True)
class PreparedText:
    text: str
    normalized: str
    token_ids: list[int]
    # (position in the normalised text, character, Unicode name) of what was left out on request
    dropped: list[tuple[int, str, str]] = field(default_factory=list)


class Voice:
    """What every backend shares: the front-end, and facts about the model."""

    backend = ""

    def __init__(self, vocab: Vocabulary, sample_rate: int, normalizer_version: int, step: int | None,
                 source: str, threads: int):
        self.vocab, self.sample_rate, self.step, self.source = vocab, sample_rate, step, source
        self.normalizer_version, self.threads = normalizer_version, threads
        self.warnings: list[str] = []
        if normalizer_version != NORMALIZER_VERSION:
            self.warnings.append(
                f"{source} was trained on text from Bangla normaliser version {normalizer_version}; this "
                f"vits-ray has version {NORMALIZER_VERSION}, so some sentences may be prepared differently")

    def prepare(self, text: str, drop_unsupported: bool = False, where: str = "") -> PreparedText:
        normalized = normalize_text(text)
        problems = self.vocab.unsupported(normalized)
        if problems and not drop_unsupported:
            raise VoiceError(str(UnsupportedCharactersError(normalized, problems, where=where))
                             + " (pass --drop-unsupported to speak the rest)")
        dropped = {p for p, _, _ in problems}
        kept = " ".join("".join(c for i, c in enumerate(normalized) if i not in dropped).split())
        if not kept:
            raise VoiceError(f"{where}nothing speakable is left of {text!r}")
        return PreparedText(text=text, normalized=kept, token_ids=self.vocab.encode(kept), dropped=problems)

    def synthesize(self, token_ids: list[int], scales: Scales = Scales()) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "backend": self.backend, "sample_rate": self.sample_rate, "step": self.step,
                "normalizer_version": self.normalizer_version, "threads": self.threads}


class TorchVoice(Voice):
    backend = "torch"

    def __init__(self, model: "Vits", coqui_config: dict[str, Any], vocab: Vocabulary, source: str,
                 threads: int):
        meta = coqui_config.get("vits_ray", {})
        # Exports from before the version was recorded were all prepared by version 1.
        super().__init__(vocab, int(coqui_config["audio"]["sample_rate"]),
                         int(meta.get("normalizer_version", 1)), meta.get("step"), source, threads)
        self.model = model
        self.coqui_config = coqui_config
        self.hop_length = int(coqui_config["audio"]["hop_length"])

    def synthesize(self, token_ids: list[int], scales: Scales = Scales()) -> np.ndarray:
        import torch

        model = self.model
        model.inference_noise_scale, model.length_scale = scales.noise, scales.length
        model.inference_noise_scale_dp = scales.noise_dp
        device = next(model.parameters()).device
        with torch.inference_mode():
            x = torch.tensor([token_ids], dtype=torch.long, device=device)
            out = model.inference(x, aux_input={"x_lengths": torch.tensor([len(token_ids)], device=device)})
        return out["model_outputs"][0, 0].float().cpu().numpy()


class OnnxVoice(Voice):
    backend = "onnx"

    def __init__(self, session, meta: dict[str, str], source: str, threads: int):
        try:
            vocab = Vocabulary.from_dict(json.loads(meta[META_PREFIX + "vocabulary"]))
            sample_rate = int(meta[META_PREFIX + "sample_rate"])
            normalizer_version = int(meta[META_PREFIX + "normalizer_version"])
        except (KeyError, ValueError) as err:
            raise VoiceError(f"{source}: not an ONNX file written by `vits-ray export` (its metadata lacks "
                             f"{err}); export it with `vits-ray export MODEL --onnx OUT.onnx`") from None
        step = meta.get(META_PREFIX + "step")
        super().__init__(vocab, sample_rate, normalizer_version, int(step) if step else None, source, threads)
        self.session = session
        self.input_names = {i.name for i in session.get_inputs()}

    @staticmethod
    def from_file(path: Path, source: str = "", threads: int = 1) -> "OnnxVoice":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # ORT warns about every unused initializer of the traced graph
        # ORT's pool threads otherwise spin for work after each run, taking the cores that PyTorch
        # (timed next, in `evaluate`) or a training job beside it needs: seen as a 4x slower torch RTF.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise VoiceError(f"{source or path}: not a loadable ONNX model ({err})") from None
        return OnnxVoice(session, dict(session.get_modelmeta().custom_metadata_map), source or str(path), threads)

    def synthesize(self, token_ids: list[int], scales: Scales = Scales()) -> np.ndarray:
        feeds = {"input": np.array([token_ids], dtype=np.int64),
                 "input_lengths": np.array([len(token_ids)], dtype=np.int64),
                 "scales": scales.as_array()}
        if "sid" in self.input_names:
            feeds["sid"] = np.array([0], dtype=np.int64)
        return self.session.run(["output"], feeds)[0][0, 0]


# --- loading ------------------------------------------------------------------------------

def vocabulary_from_coqui(coqui_config: dict[str, Any], source: str) -> Vocabulary:
    """Our vocabulary from a Coqui config's grapheme character set (exports before vocab.json)."""
    chars = coqui_config.get("characters") or {}
    if coqui_config.get("use_phonemes") or not chars.get("characters"):
        raise VoiceError(f"{source}: a phoneme-based or character-less Coqui config; vits-ray speaks models "
                         "trained on its own Bangla character vocabulary")
    try:
        return Vocabulary(characters=chars["characters"], punctuations=chars.get("punctuations") or "",
                          add_blank=bool(coqui_config.get("add_blank", True)), pad=chars["pad"], eos=chars["eos"],
                          bos=chars["bos"], blank=chars["blank"])
    except (KeyError, TypeError, ValueError) as err:
        raise VoiceError(f"{source}: its character set is not one vits-ray wrote ({err})") from None


def build_generator(coqui_config: dict[str, Any], state: dict[str, Any]) -> "Vits":
    """Coqui's Vits without its discriminator, weights loaded, weight norm folded in, in eval mode."""
    from torch.nn.utils import parametrize
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits

    config = VitsConfig()
    config.from_dict(coqui_config)
    config.model_args.init_discriminator = False
    with contextlib.redirect_stdout(io.StringIO()):  # Coqui prints its audio settings at every build
        model = Vits(config)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("disc.")})
    # The weight-normalised convolutions recompute their weights at every call; fold them once.
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight")
    return model.eval()


def load_export(local_dir: Path, source: str, threads: int = 1, device: str = "cpu") -> TorchVoice:
    """A TorchVoice from an export folder on this machine (model.pth, config.json, vocab.json)."""
    from vits_ray.checkpoint import CorruptCheckpointError, UnsafeCheckpointError, safe_load

    try:
        coqui_config = json.loads((local_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise VoiceError(f"{source}: cannot read config.json ({err})") from None
    vocab_path = local_dir / "vocab.json"
    vocab = (Vocabulary.load(vocab_path) if vocab_path.exists() else vocabulary_from_coqui(coqui_config, source))
    try:
        state = safe_load(local_dir / "model.pth")
    except (CorruptCheckpointError, UnsafeCheckpointError) as err:
        raise VoiceError(f"{source}: {err}") from None
    weights = state.get("model") if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise VoiceError(f"{source}/model.pth: no state dict under 'model'")
    try:
        model = build_generator(coqui_config, weights).to(device)
    except RuntimeError as err:  # load_state_dict: missing/unexpected keys, shapes
        raise VoiceError(f"{source}: model.pth does not match its config.json ({err})") from None
    if "vits_ray" not in coqui_config and isinstance(state.get("step"), int):
        coqui_config["vits_ray"] = {"step": state["step"]}
    return TorchVoice(model, coqui_config, vocab, source, threads)


def locate_model(source: str, storage_cfg=None):
    """(store, kind) for a model source: kind "onnx" (store of the folder, file name in `name`),
    or "export" (store of the export folder). Raises VoiceError for anything else."""
    from vits_ray.storage import StorageError, open_store

    try:
        if source.rstrip("/").endswith(".onnx"):
            folder, _, name = source.rstrip("/").rpartition("/")
            store = open_store(folder or ".", storage_cfg)
            if not store.exists(name):
                raise VoiceError(f"{source}: not found")
            return store, "onnx", name
        store = open_store(source, storage_cfg)
        if store.exists("model.pth"):
            return store, "export", ""
        if store.exists(f"{EXPORT_DIR}/model.pth"):
            return store.child(EXPORT_DIR), "export", ""
    except StorageError as err:
        raise VoiceError(f"{source}: cannot read it: {err}") from None
    raise VoiceError(f"{source}: neither model.pth nor {EXPORT_DIR}/model.pth is there; give a run (STORAGE/NAME), "
                     "an export folder (model.pth + config.json) or an .onnx file written by `vits-ray export`")


def load_voice(source: str, onnx: bool = False, threads: int | None = None, storage_cfg=None) -> Voice:
    """The voice at `source` (local or s3://): a run, an export folder or an .onnx file. With `onnx`, an
    export folder is spoken through ONNX Runtime: its model.onnx if `vits-ray export` left one there,
    else it is exported now (with the parity check)."""
    import torch

    threads = threads or torch.get_num_threads()
    store, kind, name = locate_model(source, storage_cfg)
    with tempfile.TemporaryDirectory(prefix="vits-ray-voice-") as tmp:
        local = Path(tmp)
        if kind == "onnx":
            store.download_file(name, local / name)
            return OnnxVoice.from_file(local / name, store.url(name), threads)  # the session holds the bytes
        if onnx and store.exists("model.onnx"):
            store.download_file("model.onnx", local / "model.onnx")
            return OnnxVoice.from_file(local / "model.onnx", store.url("model.onnx"), threads)
        for file in EXPORT_FILES:
            if file != "vocab.json" or store.exists(file):  # exports before vocab.json: rebuilt from config.json
                store.download_file(file, local / file)
        voice = load_export(local, store.uri, threads)
    if onnx:
        from vits_ray.onnx_export import as_onnx_voice

        return as_onnx_voice(voice)
    return voice
