"""Coqui's VITS built from our config: construction, warm start from Coqui checkpoints, export.

This module knows Coqui and torch, nothing of Ray or storage: callers hand it local paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vits_ray.checkpoint import check_plain, safe_load
from vits_ray.config import Config

if TYPE_CHECKING:
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.models.vits import Vits

    from vits_ray.text import Vocabulary

def coqui_config(config: Config, vocab: "Vocabulary") -> "VitsConfig":
    """The Coqui `VitsConfig` equivalent to our config, with the corpus vocabulary.

    Single-speaker: multi-speaker corpora train one voice over all speakers for now.
    """
    from TTS.config.shared_configs import BaseAudioConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig

    model = config.model
    args = VitsArgs(
        num_chars=vocab.num_tokens,
        hidden_channels=model.hidden_channels,
        hidden_channels_ffn_text_encoder=model.hidden_channels_ffn_text_encoder,
        num_heads_text_encoder=model.num_heads_text_encoder,
        num_layers_text_encoder=model.num_layers_text_encoder,
        kernel_size_text_encoder=model.kernel_size_text_encoder,
        dropout_p_text_encoder=model.dropout_p_text_encoder,
        kernel_size_posterior_encoder=model.kernel_size_posterior_encoder,
        num_layers_posterior_encoder=model.num_layers_posterior_encoder,
        num_layers_flow=model.num_layers_flow,
        use_sdp=model.use_sdp,
        resblock_type_decoder=model.resblock_type_decoder,
        resblock_kernel_sizes_decoder=list(model.resblock_kernel_sizes_decoder),
        resblock_dilation_sizes_decoder=[list(d) for d in model.resblock_dilation_sizes_decoder],
        upsample_rates_decoder=list(model.upsample_rates_decoder),
        upsample_initial_channel_decoder=model.upsample_initial_channel_decoder,
        upsample_kernel_sizes_decoder=list(model.upsample_kernel_sizes_decoder),
        periods_multi_period_discriminator=list(model.periods_multi_period_discriminator),
        spec_segment_size=model.spec_segment_size,
        out_channels=config.audio.fft_size // 2 + 1,
    )
    audio = BaseAudioConfig(
        sample_rate=config.audio.sample_rate,
        fft_size=config.audio.fft_size,
        hop_length=config.audio.hop_length,
        win_length=config.audio.win_length,
        num_mels=config.audio.num_mels,
        mel_fmin=config.audio.mel_fmin,
        mel_fmax=config.audio.mel_fmax,
    )
    optim = config.optim
    return VitsConfig(
        model_args=args,
        audio=audio,
        characters=vocab.coqui_characters_config(),
        use_phonemes=False,
        text_cleaner=None,
        enable_eos_bos_chars=False,  # our ids never carry EOS/BOS; Coqui's must match them
        add_blank=vocab.add_blank,
        lr_gen=optim.lr_gen,
        lr_disc=optim.lr_disc,
        grad_clip=[optim.grad_clip_disc, optim.grad_clip_gen],
        optimizer_params={"betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
        lr_scheduler_gen_params={"gamma": optim.lr_gamma, "last_epoch": -1},
        lr_scheduler_disc_params={"gamma": optim.lr_gamma, "last_epoch": -1},
        test_sentences=[],
    )


def build_model(config: Config, vocab: "Vocabulary") -> "Vits":
    """A fresh Coqui `Vits` (generator and discriminator) on the CPU, seeded by `train.seed`."""
    from TTS.tts.models.vits import Vits

    torch.manual_seed(config.train.seed)
    return Vits(coqui_config(config, vocab))


def build_optimizers(model: "Vits", config: Config) -> list[torch.optim.Optimizer]:
    """Coqui's two optimizers (discriminator, generator), on the fused kernel when asked for.

    The fused AdamW kernel takes a `found_inf` tensor and skips a non-finite step on the device,
    so skipping needs no host sync; it exists for CPU and CUDA alike.
    """
    optimizers = model.get_optimizer()
    if not config.optim.fused:
        return optimizers
    fused = []
    for optimizer in optimizers:
        if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
            fused.append(optimizer)  # another optimizer choice: keep Coqui's
            continue
        def without_kernel_choice(options: dict) -> dict:
            return {k: v for k, v in options.items() if k not in ("foreach", "fused", "decoupled_weight_decay")}

        groups = [without_kernel_choice(group) for group in optimizer.param_groups]
        fused.append(type(optimizer)(groups, **without_kernel_choice(optimizer.defaults), fused=True))
    return fused


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- warm start ---------------------------------------------------------------------------

@dataclass
class WarmStartReport:
    """What a warm start copied and what it left as initialised."""

    loaded: list[str] = field(default_factory=list)
    partially_loaded: list[str] = field(default_factory=list)  # embedding rows of shared characters
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    global_step: int = 0
    epoch: int = 0

    def format_text(self) -> str:
        lines = [f"warm start: {len(self.loaded)} tensors loaded, {len(self.partially_loaded)} partially, "
                 f"{len(self.skipped)} left as initialised (checkpoint step {self.global_step})"]
        lines += [f"  partial: {name} (rows of shared characters)" for name in self.partially_loaded]
        lines += [f"  skipped: {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def read_coqui_vocab(coqui_cfg: dict[str, Any]) -> list[str] | None:
    """The id -> symbol list of a Coqui config's character set, as Coqui's tokenizer builds it."""
    from TTS.tts.configs.vits_config import VitsConfig
    from TTS.tts.utils.text.tokenizer import TTSTokenizer

    if not coqui_cfg.get("characters"):
        return None
    cfg = VitsConfig()
    cfg.from_dict(coqui_cfg)
    tokenizer, _ = TTSTokenizer.init_from_config(cfg)
    return list(tokenizer.characters.vocab)


def warm_start(model: "Vits", checkpoint_path: Path, config_path: Path | None) -> WarmStartReport:
    """Copy matching tensors from a Coqui checkpoint into `model`; report the rest by name and shape.

    The text embedding is remapped by character: rows of characters both vocabularies share are
    copied, new characters keep their initialisation.

    The file is read as tensors and plain data only (`safe_load`): Coqui's trainer (0.28) saves its
    config as a dict, the date as a string, counters as ints and optimizer/scheduler/scaler states as
    plain state dicts, all of which load that way; anything needing more raises UnsafeCheckpointError
    instead of running the file's code on every worker.
    """
    state = safe_load(checkpoint_path)
    source = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(source, dict) or not all(isinstance(t, torch.Tensor) for t in source.values()):
        raise ValueError(f"{checkpoint_path}: not a Coqui checkpoint (no state dict of tensors under 'model')")
    report = WarmStartReport(global_step=int(state.get("step", state.get("global_step", 0)) or 0),
                             epoch=int(state.get("epoch", 0) or 0))
    old_symbols = None
    if config_path is not None and config_path.exists():
        old_symbols = read_coqui_vocab(json.loads(config_path.read_text(encoding="utf-8")))
    new_symbols = list(model.tokenizer.characters.vocab)
    own = model.state_dict()
    merged = dict(own)
    for name, tensor in own.items():
        if name not in source:
            report.skipped.append((name, f"not in checkpoint, shape {tuple(tensor.shape)}"))
            continue
        incoming = source[name]
        if name == "text_encoder.emb.weight" and old_symbols is not None and old_symbols != new_symbols:
            rows = tensor.clone()
            old_index = {s: i for i, s in enumerate(old_symbols)}
            shared = [(i, old_index[s]) for i, s in enumerate(new_symbols) if s in old_index and old_index[s] < incoming.shape[0]]
            for new_i, old_i in shared:
                rows[new_i] = incoming[old_i]
            merged[name] = rows
            report.partially_loaded.append(name)
            continue
        if incoming.shape != tensor.shape:
            report.skipped.append((name, f"shape {tuple(incoming.shape)} in checkpoint, {tuple(tensor.shape)} here"))
            continue
        merged[name] = incoming
        report.loaded.append(name)
    unused = sorted(set(source) - set(own))
    report.skipped += [(name, "in checkpoint only") for name in unused]
    model.load_state_dict(merged)
    return report


# --- export -------------------------------------------------------------------------------

# What the export's config.json says about its input text, under a key Coqui ignores (Coqpit reads
# only its own fields): Coqui's Synthesizer has no Bangla normaliser (`text_cleaner` is unset), so it
# reads "১২৩" as nothing and drops every character outside the vocabulary with a log line.
TEXT_PREPARATION = (
    "Text must go through vits-ray's Bangla front-end before tokenizing (vits_ray.text.normalize_text: "
    "Unicode NFC, numbers, dates, times and currency spelled out in Bangladeshi usage, abbreviations "
    "expanded), exactly as the training text was. `vits-ray synth MODEL --text ...` does this and refuses "
    "characters the vocabulary lacks; Coqui's own Synthesizer/tts CLI does no normalisation and silently "
    "drops unknown characters (digits included), so give it text already normalised.")
EXPORT_FILES = ("model.pth", "config.json", "vocab.json")


def export_coqui(model: "Vits", config: Config, vocab: "Vocabulary", out_dir: Path, step: int,
                 normalizer_version: int | None = None) -> Path:
    """Write `model.pth` and `config.json` in Coqui's own format (Coqui's Synthesizer loads them), and
    our `vocab.json` beside them; config.json also states how text must be prepared."""
    from vits_ray.text import NORMALIZER_VERSION

    out_dir.mkdir(parents=True, exist_ok=True)
    vits_config = coqui_config(config, vocab)
    state = {"model": model.state_dict(), "config": vits_config.to_dict(), "step": step, "model_type": "vits"}
    check_plain(state, "export")  # Coqui and our warm start read it with weights_only=True
    tmp = out_dir / "model.pth.tmp"
    torch.save(state, tmp)
    tmp.replace(out_dir / "model.pth")
    coqui_json = vits_config.to_dict()
    coqui_json["vits_ray"] = {
        "text_preparation": TEXT_PREPARATION,
        "normalizer_version": normalizer_version if normalizer_version is not None else NORMALIZER_VERSION,
        "vocabulary_file": "vocab.json",
        "step": step,
    }
    (out_dir / "config.json").write_text(json.dumps(coqui_json, indent=4, ensure_ascii=False), encoding="utf-8")
    (out_dir / "vocab.json").write_text(vocab.to_json(), encoding="utf-8")
    return out_dir
