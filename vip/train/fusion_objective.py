"""Everything at Once in training: the objective, and audio for the fine-tuning clips.

`FusionObjective` is what `train_step` calls for `finetune.method=eao` (and for any trainer whose
batches carry `audio`): one forward of the `EAOModel` gives t, v, a, tv, va, ta; every embedding
and the modality-presence masks are gathered across ranks with gradient
(vip.train.distributed.gather_features), and the combinatorial loss (vip.losses) runs on the
global batch, so a 2-rank step has the 1-process gradient (docs/fusion.md).

`AudioClips` wraps the fine-tuning dataset (vip.train.finetune.TrainVideos): each clip file's
soundtrack → a log-mel window (shards.audio, the `data.audio_*` settings; random window in
training, drawn from the same per-(seed, epoch, item) generator as the frame jitter). A file
without audio gives an all-padding spectrogram (the clip drops out of the audio terms).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from shards.audio import clip_log_mel
from shards.config import DataConfig
from vip.config import LossConfig
from vip.losses import combinatorial_loss
from vip.train.distributed import gather_features
from vip.train.runtime import Runtime

log = logging.getLogger(__name__)
EMBEDDINGS = ("t", "v", "a", "tv", "va", "ta")


class FusionObjective:
    """(module, batch{video [B,T,3,H,W], text [B,L], audio [B,n_mels,F], audio_mask [B,F]}) →
    (L_comb, {term: value})."""

    def __init__(self, loss: LossConfig, rt: Runtime):
        self.weights, self.temperature, self.rt = tuple(loss.fusion_weights), loss.fusion_temperature, rt

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        dev, dt = self.rt.device, self.rt.dtype
        out = module(video=batch["video"].to(dev, dt, non_blocking=True),
                     text=batch["text" if "text" in batch else "subtitle"].to(dev, non_blocking=True),
                     audio=batch["audio"].to(dev, dt, non_blocking=True),
                     audio_mask=batch["audio_mask"].to(dev, non_blocking=True))
        emb = {k: gather_features(out[k]) for k in EMBEDDINGS}                              # [world·B, P]
        present = {m: gather_features(out[f"present_{m}"]) for m in "tva"}                 # [world·B]
        total, terms = combinatorial_loss(emb, present, weights=self.weights, temperature=self.temperature)
        # the fusion model has no use for CLIP's logit scale; 0·scale keeps every parameter in the graph
        return total + 0.0 * out["logit_scale"], terms


class AudioClips(torch.utils.data.Dataset):
    """TrainVideos + each clip's audio: items (clip_id, video, text, mel, mel_mask)."""

    def __init__(self, videos, audio: DataConfig):
        self.videos, self.audio = videos, audio

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        clip_id, video, text = self.videos[i]
        # its own generator: the frame jitter of TrainVideos is unchanged
        rng = np.random.default_rng([self.videos.seed, self.videos.epoch, i, 11])
        mel, mask = clip_log_mel(self.videos.files[clip_id].read_bytes(), self.audio, True, rng)
        return clip_id, video, text, torch.from_numpy(mel), torch.from_numpy(mask)


class AudioCollate:
    """Samples → {"key", "video" [B,T,3,H,W], "text" [B,L], "audio" [B,n_mels,F], "audio_mask" [B,F]}."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, samples):
        return {"key": [s[0] for s in samples], "video": torch.stack([s[1] for s in samples]),
                "text": self.tokenize([s[2] for s in samples]), "audio": torch.stack([s[3] for s in samples]),
                "audio_mask": torch.stack([s[4] for s in samples])}
