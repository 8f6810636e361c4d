"""The typed batch the reader yields, and its conversion to what Coqui's `Vits` expects."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class VitsBatch:
    ids: list[str]
    speakers: list[str]
    texts: list[str]
    tokens: torch.Tensor  # [B, T_text] int64, padded with the vocabulary's pad id
    token_lens: torch.Tensor  # [B] int64
    waveform: torch.Tensor  # [B, 1, T_audio] float32 in [-1, 1], zero-padded
    waveform_lens: torch.Tensor  # [B] int64
    # A repeat from the start of the epoch that evens out the ranks' batch counts; the reader sets it.
    wrapped: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def waveform_rel_lens(self) -> torch.Tensor:
        return self.waveform_lens.float() / self.waveform_lens.max().float()

    @property
    def num_samples(self) -> int:
        return int(self.waveform_lens.sum())

    @property
    def padded_samples(self) -> int:
        return int(self.waveform.shape[0] * self.waveform.shape[-1]) - self.num_samples

    def audio_seconds(self, sample_rate: int) -> float:
        """Seconds of real (unpadded) audio in the batch."""
        return self.num_samples / sample_rate

    def pin_memory(self) -> VitsBatch:
        """The batch with its tensors in page-locked memory, so `to_coqui(cuda, non_blocking=True)`
        copies asynchronously. Needs CUDA."""
        return replace(self, tokens=self.tokens.pin_memory(), token_lens=self.token_lens.pin_memory(),
                       waveform=self.waveform.pin_memory(), waveform_lens=self.waveform_lens.pin_memory())

    def to_coqui(self, device: torch.device | str = "cpu", non_blocking: bool = False) -> dict:
        """The dict `Vits.format_batch` and `format_batch_on_device` take (Coqui's collate keys)."""
        def to(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return {
            "tokens": to(self.tokens),
            "token_lens": to(self.token_lens),
            "token_rel_lens": to(self.token_lens.float() / self.token_lens.max().float()),
            "waveform": to(self.waveform),
            "waveform_lens": to(self.waveform_lens),
            "waveform_rel_lens": to(self.waveform_rel_lens),
            "speaker_names": list(self.speakers),
            "language_names": [None] * len(self.ids),
            "audio_files": list(self.ids),
            "raw_text": list(self.texts),
            "audio_unique_names": list(self.ids),
        }


def collate(ids: list[str], speakers: list[str], texts: list[str], token_ids: list[np.ndarray],
            audio: list[np.ndarray], pad_id: int) -> VitsBatch:
    """Pad token ids and int16 PCM audio into a VitsBatch."""
    batch_size = len(ids)
    token_lens = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    tokens = torch.full((batch_size, int(token_lens.max())), pad_id, dtype=torch.long)
    wave_lens = torch.tensor([len(a) for a in audio], dtype=torch.long)
    waveform = torch.zeros(batch_size, 1, int(wave_lens.max()), dtype=torch.float32)
    for i, (tok, pcm) in enumerate(zip(token_ids, audio)):
        tokens[i, : len(tok)] = torch.from_numpy(np.asarray(tok, dtype=np.int64))
        waveform[i, 0, : len(pcm)] = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
    return VitsBatch(ids=ids, speakers=speakers, texts=texts, tokens=tokens, token_lens=token_lens,
                     waveform=waveform, waveform_lens=wave_lens)
