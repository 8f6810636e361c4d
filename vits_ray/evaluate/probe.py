"""Quality measured during training: the model speaks a fixed few val utterances every
`eval.every_steps` steps, scored against their recordings with the same metrics as `vits-ray evaluate`.

The utterances are the first `eval.utterances` of the val split by id, dealt round-robin to the
ranks; each rank returns its sums in one tensor on the training device and the trainer all-reduces
it, so every rank gets the same figures (and takes the same best-model decision) at the cost of one
collective. References are analysed once. Synthesis runs in eval mode under a forked, fixed seed,
so it neither shifts training's random streams nor varies from one measurement to the next for
reasons other than the weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vits_ray.evaluate.metrics import DEFAULT_SETTINGS, Analysis, MetricSettings, analyse, compare

# Sums, in this order, in the tensor a rank contributes.
SLOTS = ("mcd_dtw_db", "f0_rmse_cents", "f0_count", "vuv_error", "duration_ratio", "scored", "failed")


class QualityProbe:
    def __init__(self, store, manifest: dict, vocab, count: int, rank: int, world_size: int, seed: int,
                 settings: MetricSettings = DEFAULT_SETTINGS):
        from vits_ray.evaluate.heldout import read_held_out

        self.utterances = read_held_out(store, manifest, "val", count)[rank::world_size]
        self.tokens = [vocab.encode(u.text) for u in self.utterances]
        self.seed, self.settings = seed, settings
        self._references: dict[str, Analysis] = {}
        # The latest failure on this rank, for the console (a blown-up model's synthesis raises).
        self.last_error = ""

    def _reference(self, index: int) -> Analysis:
        utterance = self.utterances[index]
        if utterance.id not in self._references:
            self._references[utterance.id] = analyse(utterance.audio, utterance.sample_rate, self.settings,
                                                     name=f"{utterance.id} reference")
        return self._references[utterance.id]

    def measure(self, model, device: torch.device) -> torch.Tensor:
        """This rank's sums (see SLOTS) as a float64 tensor on `device`."""
        sums = dict.fromkeys(SLOTS, 0.0)
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
                for index, tokens in enumerate(self.tokens):
                    torch.manual_seed(self.seed + index)
                    try:
                        audio = self._speak(model, tokens, device)
                        scores = compare(self._reference(index),
                                         analyse(audio, self.utterances[index].sample_rate, self.settings))
                    except Exception as err:  # noqa: BLE001 - measuring must never end a run: counted, named
                        sums["failed"] += 1
                        self.last_error = f"{self.utterances[index].id}: {type(err).__name__}: {err}"[:300]
                        continue
                    sums["scored"] += 1
                    for key in ("mcd_dtw_db", "vuv_error", "duration_ratio"):
                        sums[key] += getattr(scores, key)
                    if math.isfinite(scores.f0_rmse_cents):
                        sums["f0_rmse_cents"] += scores.f0_rmse_cents
                        sums["f0_count"] += 1
        finally:
            model.train(was_training)
        return torch.tensor([sums[k] for k in SLOTS], dtype=torch.float64, device=device)

    @staticmethod
    def _speak(model, tokens: list[int], device: torch.device) -> np.ndarray:
        x = torch.tensor([tokens], dtype=torch.long, device=device)
        out = model.inference(x, aux_input={"x_lengths": torch.tensor([len(tokens)], device=device)})
        audio = out["model_outputs"][0, 0].float().cpu().numpy()
        if not np.isfinite(audio).all():
            raise ValueError("non-finite audio")
        return audio


def quality_record(totals: list[float], step: int, epoch: int) -> dict:
    """The `quality` record from the all-reduced sums: means over the scored utterances."""
    sums = dict(zip(SLOTS, totals))
    scored = sums["scored"]

    def mean(key: str, count: float) -> float:
        return sums[key] / count if count else float("nan")

    return {"kind": "quality", "step": step, "epoch": epoch, "utterances": int(scored), "failed": int(sums["failed"]),
            "mcd_dtw_db": mean("mcd_dtw_db", scored), "f0_rmse_cents": mean("f0_rmse_cents", sums["f0_count"]),
            "vuv_error": mean("vuv_error", scored), "duration_ratio": mean("duration_ratio", scored)}
