"""One frozen, typed configuration tree, loaded from TOML recipes and `--set` overrides.

A recipe is a TOML file with one table per section. It may start with
`extends = "other.toml"` (a path relative to the recipe) so small recipes stay short deltas
over the reference one. Every key is checked against the dataclass it lands in: unknown keys,
wrong types and impossible values raise `ConfigError` naming the key before anything runs.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from vits_ray.errors import NonRetryable

# Recipes live beside the job entrypoints so `ray job submit` ships them with the working dir.
RECIPE_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


class ConfigError(NonRetryable, ValueError):
    """A user error in a recipe or an override; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True, kw_only=True)
class AudioConfig:
    sample_rate: int = 22050
    fft_size: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    num_mels: int = 80
    mel_fmin: float = 0.0
    mel_fmax: Optional[float] = None

    def validate(self, prefix: str) -> None:
        _check(8000 <= self.sample_rate <= 48000, f"{prefix}.sample_rate", "must be between 8000 and 48000 Hz")
        _check(self.hop_length > 0, f"{prefix}.hop_length", "must be positive")
        _check(0 < self.win_length <= self.fft_size, f"{prefix}.win_length", "must be in (0, fft_size]")
        _check(self.num_mels > 0, f"{prefix}.num_mels", "must be positive")
        nyquist = self.sample_rate / 2
        _check(0 <= self.mel_fmin < nyquist, f"{prefix}.mel_fmin", f"must be in [0, {nyquist})")
        if self.mel_fmax is not None:
            _check(self.mel_fmin < self.mel_fmax <= nyquist, f"{prefix}.mel_fmax", f"must be in (mel_fmin, {nyquist}]")


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    language: Literal["bn"] = "bn"
    # Characters accepted in transcripts besides the Bangla block and the model's punctuation.
    allowed_extra_chars: str = ""
    add_blank: bool = True

    def validate(self, prefix: str) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The fields of Coqui's `VitsArgs` we expose; defaults are Coqui's (83M parameters)."""

    hidden_channels: int = 192
    hidden_channels_ffn_text_encoder: int = 768
    num_heads_text_encoder: int = 2
    num_layers_text_encoder: int = 6
    kernel_size_text_encoder: int = 3
    dropout_p_text_encoder: float = 0.1
    kernel_size_posterior_encoder: int = 5
    num_layers_posterior_encoder: int = 16
    num_layers_flow: int = 4
    use_sdp: bool = True
    resblock_type_decoder: Literal["1", "2"] = "1"
    resblock_kernel_sizes_decoder: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes_decoder: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates_decoder: tuple[int, ...] = (8, 8, 2, 2)
    upsample_initial_channel_decoder: int = 512
    upsample_kernel_sizes_decoder: tuple[int, ...] = (16, 16, 4, 4)
    periods_multi_period_discriminator: tuple[int, ...] = (2, 3, 5, 7, 11)
    # Number of spectrogram frames the decoder sees per utterance in training.
    spec_segment_size: int = 32

    def validate(self, prefix: str) -> None:
        for name in ("hidden_channels", "hidden_channels_ffn_text_encoder", "num_heads_text_encoder",
                     "num_layers_text_encoder", "num_layers_posterior_encoder", "num_layers_flow",
                     "upsample_initial_channel_decoder", "spec_segment_size"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _check(self.hidden_channels % self.num_heads_text_encoder == 0, f"{prefix}.hidden_channels",
               "must be divisible by num_heads_text_encoder")
        _check(0.0 <= self.dropout_p_text_encoder < 1.0, f"{prefix}.dropout_p_text_encoder", "must be in [0, 1)")
        _check(len(self.upsample_rates_decoder) == len(self.upsample_kernel_sizes_decoder),
               f"{prefix}.upsample_kernel_sizes_decoder", "needs one kernel size per upsample rate")
        _check(len(self.resblock_kernel_sizes_decoder) == len(self.resblock_dilation_sizes_decoder),
               f"{prefix}.resblock_dilation_sizes_decoder", "needs one dilation list per resblock kernel size")
        width = 3 if self.resblock_type_decoder == "1" else 2
        _check(all(len(d) == width for d in self.resblock_dilation_sizes_decoder),
               f"{prefix}.resblock_dilation_sizes_decoder",
               f"resblock type {self.resblock_type_decoder} takes {width} dilations per kernel size")

    def upsample_factor(self) -> int:
        factor = 1
        for rate in self.upsample_rates_decoder:
            factor *= rate
        return factor


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr_gen: float = 2e-4
    lr_disc: float = 2e-4
    betas: tuple[float, float] = (0.8, 0.99)
    eps: float = 1e-9
    weight_decay: float = 0.01
    grad_clip_gen: float = 1000.0
    grad_clip_disc: float = 1000.0
    # "exponential" is Coqui's ExponentialLR stepped once per epoch.
    lr_schedule: Literal["exponential", "warmup_exponential", "cosine", "constant"] = "exponential"
    lr_gamma: float = 0.999875
    warmup_steps: int = 0
    cosine_total_steps: int = 100_000
    min_lr_ratio: float = 0.0
    # Where the schedule's clock starts: a continuation (a sweep from a run's checkpoint, or
    # `train --from-run`) applies its schedule from the step and epoch it starts at, so warmup runs
    # over its first steps and exponential decay counts its own epochs. 0: the run's beginning.
    schedule_start_step: int = 0
    schedule_start_epoch: int = 0
    # AdamW's fused kernel: faster, and it skips a non-finite step on the device (no host sync).
    fused: bool = True

    def validate(self, prefix: str) -> None:
        for name in ("lr_gen", "lr_disc"):
            _check(0.0 < getattr(self, name) < 1.0, f"{prefix}.{name}", "must be in (0, 1)")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"{prefix}.betas", "each beta must be in [0, 1)")
        _check(self.eps > 0, f"{prefix}.eps", "must be positive")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _check(self.grad_clip_gen > 0 and self.grad_clip_disc > 0, f"{prefix}.grad_clip_gen",
               "gradient clip thresholds must be positive")
        _check(0.0 < self.lr_gamma <= 1.0, f"{prefix}.lr_gamma", "must be in (0, 1]")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", "must be >= 0")
        _check(self.cosine_total_steps > 0, f"{prefix}.cosine_total_steps", "must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        _check(self.schedule_start_step >= 0, f"{prefix}.schedule_start_step", "must be >= 0")
        _check(self.schedule_start_epoch >= 0, f"{prefix}.schedule_start_epoch", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    seed: int = 54321
    # Batches are formed by length: at most `batch_size` utterances and `max_batch_seconds` of audio.
    batch_size: int = 32
    max_batch_seconds: float = 300.0
    epochs: int = 1000
    max_steps: int = 0  # 0: no limit besides epochs
    save_step: int = 500
    keep_last: int = 3
    # Every step is recorded; per-step values are fetched from the device, averaged over ranks and
    # shown to the stability guard every `log_step` steps (and at every save, validation, epoch end).
    log_step: int = 1
    val_step: int = 500
    val_batches: int = 8
    # "auto": fp16 with a GradScaler on GPU, fp32 on CPU. fp16 and bf16 run on the CPU too (slower
    # than fp32 there: a rehearsal of a GPU recipe, and the precision logic exercised without a GPU).
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = "auto"
    # The loss scale a fresh GradScaler starts from (PyTorch's and Coqui's default, 2**16). It halves
    # at each overflowing step until the gradients fit (calibration, see stability.AmpScaleMonitor).
    amp_init_scale: float = 65536.0
    keep_step: bool = False
    # Gradients are averaged across ranks in buckets of about this size, launched during backward.
    grad_bucket_mb: float = 25.0
    # "bf16" halves the all-reduce traffic at the cost of gradient precision.
    grad_compression: Literal["none", "bf16"] = "none"
    # Worker errors (a killed worker, a lost node, an outage longer than the storage retries)
    # restart the worker group from the latest checkpoint this many times; -1: without limit.
    max_failures: int = 3

    def validate(self, prefix: str) -> None:
        _check(self.grad_bucket_mb > 0, f"{prefix}.grad_bucket_mb", "must be positive")
        _check(self.amp_init_scale > 0, f"{prefix}.amp_init_scale", "must be positive")
        _check(self.max_failures >= -1, f"{prefix}.max_failures", "must be >= 0, or -1 for no limit")
        for name in ("batch_size", "epochs", "save_step", "keep_last", "log_step", "val_step", "val_batches"):
            _check(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _check(self.max_batch_seconds > 0, f"{prefix}.max_batch_seconds", "must be positive")
        _check(self.max_steps >= 0, f"{prefix}.max_steps", "must be >= 0 (0 means no limit)")
        _check(self.seed >= 0, f"{prefix}.seed", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    min_seconds: float = 0.5
    max_seconds: float = 15.0
    val_fraction: float = 0.05
    trim_top_db: float = 40.0
    # A sample at or above this absolute value (full scale 1.0) counts as clipped.
    clip_threshold: float = 0.999
    max_clipped_fraction: float = 0.01
    rows_per_shard: int = 256
    cache_dir: str = ""  # empty: a temporary folder per worker, removed when its reader closes
    # GiB of remote shards cached locally; beyond it the least recently used are evicted. A
    # cache_dir shared by several workers is kept under it by each of them.
    cache_max_gb: float = 20.0
    # Shards fetched ahead; at least the reader's shuffle window (4), so a new window never waits.
    prefetch_shards: int = 4

    def validate(self, prefix: str) -> None:
        _check(0 < self.min_seconds < self.max_seconds, f"{prefix}.min_seconds", "must be in (0, max_seconds)")
        _check(0.0 <= self.val_fraction < 1.0, f"{prefix}.val_fraction", "must be in [0, 1)")
        _check(self.trim_top_db > 0, f"{prefix}.trim_top_db", "must be positive")
        _check(0.0 < self.clip_threshold <= 1.0, f"{prefix}.clip_threshold", "must be in (0, 1]")
        _check(0.0 <= self.max_clipped_fraction <= 1.0, f"{prefix}.max_clipped_fraction", "must be in [0, 1]")
        _check(self.rows_per_shard > 0, f"{prefix}.rows_per_shard", "must be positive")
        _check(self.prefetch_shards >= 0, f"{prefix}.prefetch_shards", "must be >= 0")
        _check(self.cache_max_gb > 0, f"{prefix}.cache_max_gb", "must be positive")

    @property
    def cache_max_bytes(self) -> int:
        """`cache_max_gb` in bytes, for ShardReader(cache_max_bytes=...)."""
        return int(self.cache_max_gb * (1 << 30))


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    # Empty: taken from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS itself.
    endpoint_url: str = ""
    region: str = ""
    # Transient failures (endpoint down, throttling, 5xx) are retried with exponential backoff for
    # this long before an operation fails; 0 disables retries. Missing keys and denied access fail at once.
    retry_seconds: float = 300.0
    retry_initial_seconds: float = 0.5
    # The cap on one wait: a run notices within about this long that storage is back.
    retry_max_backoff_seconds: float = 10.0

    def validate(self, prefix: str) -> None:
        if self.endpoint_url:
            _check(self.endpoint_url.startswith(("http://", "https://")), f"{prefix}.endpoint_url",
                   "must start with http:// or https://")
        _check(self.retry_seconds >= 0, f"{prefix}.retry_seconds", "must be >= 0 (0: no retries)")
        _check(self.retry_initial_seconds > 0, f"{prefix}.retry_initial_seconds", "must be positive")
        _check(self.retry_max_backoff_seconds >= self.retry_initial_seconds, f"{prefix}.retry_max_backoff_seconds",
               "must be >= retry_initial_seconds")


@dataclass(frozen=True, kw_only=True)
class StabilityConfig:
    enabled: bool = True
    window: int = 200
    min_history: int = 50
    # A generator loss above median + threshold_mads * MAD of its recent window is a spike.
    threshold_mads: float = 8.0
    # ... and it must also exceed the median by this fraction, so a flat curve's tiny MAD cannot trigger.
    min_relative_jump: float = 0.25
    confirm_steps: int = 3
    lr_backoff: float = 0.5
    warmup_steps_after_rollback: int = 0
    unstable_save_step: int = 100
    calm_steps: int = 500
    max_rollbacks: int = 3
    rollback_window_steps: int = 5000
    min_amp_scale: float = 1.0
    # This many non-finite steps in a row (NaN/inf loss or grad norm) escalate to a rollback. Above
    # the handful of overflows a fresh GradScaler needs to calibrate at the start.
    max_consecutive_nonfinite: int = 10
    # The AMP scale decreasing this many times without growing, within this many steps, is a collapse.
    amp_max_halvings: int = 10
    amp_halving_window_steps: int = 1000
    # An exception from Coqui's forward is a blow-up (roll back), not a bug, when a module's weights
    # grew more than this factor since the last clean checkpoint, or when one of the last
    # `blowup_lookback_steps` observed steps had an elevated loss (see vits_ray.blowup).
    blowup_norm_factor: float = 10.0
    blowup_lookback_steps: int = 5

    def validate(self, prefix: str) -> None:
        _check(self.window >= 5, f"{prefix}.window", "must be >= 5")
        _check(2 <= self.min_history <= self.window, f"{prefix}.min_history", "must be in [2, window]")
        _check(self.threshold_mads > 0, f"{prefix}.threshold_mads", "must be positive")
        _check(self.min_relative_jump >= 0, f"{prefix}.min_relative_jump", "must be >= 0")
        _check(self.confirm_steps >= 1, f"{prefix}.confirm_steps", "must be >= 1")
        _check(0.0 < self.lr_backoff <= 1.0, f"{prefix}.lr_backoff", "must be in (0, 1]")
        _check(self.unstable_save_step > 0, f"{prefix}.unstable_save_step", "must be positive")
        _check(self.calm_steps > 0, f"{prefix}.calm_steps", "must be positive")
        _check(self.max_rollbacks >= 1, f"{prefix}.max_rollbacks", "must be >= 1")
        _check(self.rollback_window_steps > 0, f"{prefix}.rollback_window_steps", "must be positive")
        _check(self.warmup_steps_after_rollback >= 0, f"{prefix}.warmup_steps_after_rollback", "must be >= 0")
        _check(self.min_amp_scale >= 0, f"{prefix}.min_amp_scale", "must be >= 0")
        _check(self.max_consecutive_nonfinite >= 1, f"{prefix}.max_consecutive_nonfinite", "must be >= 1")
        _check(self.amp_max_halvings >= 1, f"{prefix}.amp_max_halvings", "must be >= 1")
        _check(self.amp_halving_window_steps > 0, f"{prefix}.amp_halving_window_steps", "must be positive")
        _check(self.blowup_norm_factor > 1.0, f"{prefix}.blowup_norm_factor", "must be > 1")
        _check(self.blowup_lookback_steps >= 1, f"{prefix}.blowup_lookback_steps", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Objective quality measured during training on a fixed few val utterances (MCD-DTW, F0 RMSE,
    voicing error, duration ratio; see vits_ray.evaluate). When on, `best/` is chosen by MCD."""

    every_steps: int = 0  # 0: off
    utterances: int = 4  # the first N of the val split by id, shared out over the ranks

    def validate(self, prefix: str) -> None:
        _check(self.every_steps >= 0, f"{prefix}.every_steps", "must be >= 0 (0: off)")
        _check(self.utterances >= 1, f"{prefix}.utterances", "must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """How a sweep judges a trial (`vits-ray tune`); a training run ignores it. See vits_ray.tune."""

    # The score's loss: the mean validation mel loss of the trial's last this-many validations.
    score_validations: int = 3
    # The score's own noise: the final validation repeated under this many other seeds (0: off).
    noise_seeds: int = 4
    # The stability margin probe: margin_steps steps at margin_multiplier x both learning rates
    # from the trial's state, then restored exactly. It fails on a spike, a blow-up, a non-finite
    # step, or a probe loss more than margin_max_loss_rise (relative) above the trial's own; a
    # trial with a failed probe has its score multiplied by 1 + margin_penalty.
    margin_multiplier: float = 2.0
    margin_steps: int = 3
    margin_max_loss_rise: float = 0.25
    margin_penalty: float = 1.0

    def validate(self, prefix: str) -> None:
        _check(self.score_validations >= 1, f"{prefix}.score_validations", "must be >= 1")
        _check(self.noise_seeds >= 0, f"{prefix}.noise_seeds", "must be >= 0 (0: off)")
        _check(self.margin_multiplier >= 1.0, f"{prefix}.margin_multiplier", "must be >= 1")
        _check(self.margin_steps >= 0, f"{prefix}.margin_steps", "must be >= 0 (0: no probe)")
        _check(self.margin_max_loss_rise > 0, f"{prefix}.margin_max_loss_rise", "must be positive")
        _check(self.margin_penalty >= 0, f"{prefix}.margin_penalty", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Config:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(section.name)
        _check(self.audio.hop_length == self.model.upsample_factor(), "model.upsample_rates_decoder",
               f"their product ({self.model.upsample_factor()}) must equal audio.hop_length ({self.audio.hop_length})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# --- building from plain data -------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or omitted)"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    wrong = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: "
                              + ", ".join(repr(a) for a in typing.get_args(tp)))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise wrong
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{section}.{key}: unknown key; allowed keys in [{section}]: {', '.join(allowed)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    sections = {}
    for name, values in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{name}: unknown section; allowed sections: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a table of keys, got {values!r}")
        sections[name] = _build_section(SECTIONS[name], values, name)
    return Config(**sections)


# --- recipes and overrides ----------------------------------------------------------------

def _merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe path as given, or the name of a bundled recipe (`tiny`, `bn_bd_vits.toml`)."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    name = candidate.name if candidate.suffix == ".toml" else f"{candidate.name}.toml"
    bundled = RECIPE_DIR / name
    if bundled.exists():
        return bundled
    raise ConfigError(f"recipe {str(path)!r} not found (bundled recipes: "
                      + ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))) + ")")


def load_recipe_dict(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = resolve_recipe_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: recipes extend each other in a loop")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends must be a file name")
    return _merge(load_recipe_dict(path.parent / parent, _seen + (path,)), data)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optim.lr_gen=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    data = load_recipe_dict(path) if path is not None else {}
    for text in overrides:
        section, key, value = parse_override(text)
        data = _merge(data, {section: {key: value}})
    return config_from_dict(data)


def replace(config: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `config` with some keys changed, validated like an override."""
    data = config.to_dict()
    for section, values in sections.items():
        data = _merge(data, {section: values})
    return config_from_dict(data)


# --- printing -----------------------------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise AssertionError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, dict[str, Any]]) -> str:
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is unset")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# What a resumed run may change: how long it runs, how often it saves, logs and validates, and
# where it caches and reads. Everything else shapes the model, the data or the optimisation, and a
# resumed run that changed it would silently be a different run.
RESUMABLE_KEYS = frozenset({
    "train.epochs", "train.max_steps", "train.save_step", "train.keep_last", "train.log_step",
    "train.val_step", "train.val_batches", "data.cache_dir", "data.prefetch_shards",
    "storage.endpoint_url", "storage.region", "storage.retry_seconds", "storage.retry_initial_seconds",
    "storage.retry_max_backoff_seconds", "train.max_failures",
    "data.cache_max_gb", "eval.every_steps", "eval.utterances",
    "train.amp_init_scale",  # only seeds a fresh GradScaler; a resumed one has its checkpointed scale
    *(f"tune.{f.name}" for f in dataclasses.fields(TuneConfig)),
})


def resume_conflicts(saved: Config, current: Config) -> list[str]:
    """`section.key: saved -> current` for every difference a resumed run may not make."""
    out = []
    saved_dict, current_dict = saved.to_dict(), current.to_dict()
    for section, values in current_dict.items():
        for key, value in values.items():
            before = saved_dict.get(section, {}).get(key)
            if f"{section}.{key}" not in RESUMABLE_KEYS and before != value:
                out.append(f"{section}.{key}: {before!r} -> {value!r}")
    return out
