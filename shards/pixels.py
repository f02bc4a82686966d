"""Pixels between the reader's workers and the model: uint8 frames stacked into shared memory in
the workers, CLIP-normalised channels-first floats on the device the model runs on (the last
stage of shards.reader; docs/architecture.md, "Batches")."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.utils.data import get_worker_info

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SCALE = (1.0 / (255.0 * torch.tensor(CLIP_STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)


@functools.lru_cache(maxsize=8)
def _affine_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(_SCALE, _SHIFT) on `device`, copied there once rather than per batch."""
    return _SCALE.to(device), _SHIFT.to(device)


def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; inside a DataLoader worker it lives in shared memory, so handing it
    to the main process copies nothing (torch's default path would copy it into shared memory)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def stack_pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 arrays [..., H, W, 3] of one shape → uint8 [n, ..., H, W, 3], stacked in one copy."""
    out = _empty((len(arrays), *arrays[0].shape), torch.uint8)
    np.stack(arrays, out=out.numpy())
    return out


def normalise_pixels(pixels: torch.Tensor, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., H, W, 3] → CLIP-normalised [..., 3, H, W] (contiguous) in `dtype` on `device`.

    The copy to the device comes first, so on a GPU the arithmetic runs there. Computed in
    float32 and then cast: the same values as `normalise` on any device (bit-identical on CPU)."""
    x = pixels.to(device if device is not None else pixels.device, non_blocking=True).movedim(-1, -3)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    scale, shift = _affine_on(x.device)
    x.mul_(scale).add_(shift)
    return x if dtype == torch.float32 else x.to(dtype)


def to_model_input(batch: dict, device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict:
    """A worker batch (uint8 pixels) → the model's input tensors (docs/architecture.md, "Batches")
    on `device`: pixels normalised there in `dtype`, the other tensors moved; each tensor crosses
    to the device once."""
    pixels = {"video", "frame"}
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in pixels else v
           for k, v in batch.items()}
    out["video"] = normalise_pixels(batch["video"], device, dtype)    # [B, T, 3, H, W]
    out["frame"] = normalise_pixels(batch["frame"], device, dtype)    # [B, 3, H, W]
    return out


def normalise(frames: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] → CLIP-normalised float [..., 3, H, W] (contiguous), on the CPU.

    For per-sample paths (evaluation, fine-tuning, inference): one copy into a channels-first
    float tensor (in shared memory inside a DataLoader worker), then scale and shift in place."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)
    out = _empty(tuple(x.shape), torch.float32)
    out.copy_(x)
    return out.mul_(_SCALE).add_(_SHIFT)
