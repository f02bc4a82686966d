"""Frame sampling and decoding of stored clips.

`sample_indices` picks T frame indices (training jitter as in the reference,
evenly spaced for evaluation); `decode_frames` decodes only up to the last
sampled frame, seeking to a later keyframe when that skips decoding work, and
converts only the sampled frames to RGB (resized in the same libswscale pass).
"""
from __future__ import annotations

import io

import av
import numpy as np
from av.video.reformatter import VideoReformatter


def sample_indices(num_frames: int, T: int, train: bool, rng: np.random.Generator | None = None) -> np.ndarray:
    """T indices into a clip of `num_frames` frames.

    The clip is cut into T equal intervals (integer edges, as the reference).
    train: the first index is drawn uniformly from the first interval, the last
    from the last interval, and the T indices are spread evenly between them.
    eval: the centre of each interval. Clips with fewer
    than T frames repeat frames (the reference pads the same way).
    """
    if num_frames <= 0:
        raise ValueError("clip has no frames")
    # integer interval edges and inclusive ranges, as the reference computes them
    edges = np.linspace(0, num_frames, T + 1).astype(np.int64)
    lo = edges[:-1]
    hi = np.maximum(lo, edges[1:] - 1)
    if train:
        assert rng is not None
        start = int(rng.integers(lo[0], hi[0] + 1))
        end = max(start, int(rng.integers(lo[-1], hi[-1] + 1)))
        idx = np.round(np.linspace(start, end, T)).astype(np.int64)
    else:
        idx = (lo + hi) // 2
    return np.clip(idx, 0, num_frames - 1)


def output_size(width: int, height: int, size: int, resize: str) -> tuple[int, int]:
    """Size to reformat to before any crop: squash → (size, size); crop → short side = size."""
    if resize == "squash":
        return size, size
    if resize == "crop":
        s = size / min(width, height)
        return max(size, int(round(width * s))), max(size, int(round(height * s)))
    raise ValueError(f"resize must be squash or crop, got {resize!r}")


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """[..., H, W, C] → [..., size, size, C]."""
    h, w = arr.shape[-3], arr.shape[-2]
    top, left = (h - size) // 2, (w - size) // 2
    return arr[..., top:top + size, left:left + size, :]


def decode_jpeg(data: bytes, size: int, resize: str = "squash", resample: str = "bilinear") -> np.ndarray:
    """JPEG bytes → uint8 [size, size, 3]: squash to size², or short side → size + centre crop.

    Only JPEG is accepted (anything else raises ValueError). libjpeg's DCT scaling decodes big
    frames at a reduced size first; `convert` forces the full decode, so corrupt or truncated
    data raises here rather than later. resample: bilinear (reader) | bicubic (captioners)."""
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    if img.format != "JPEG":
        raise ValueError(f"not a JPEG ({img.format})")
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    w, h = output_size(img.width, img.height, size, resize)
    arr = np.asarray(img.resize((w, h), {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[resample]))
    return np.ascontiguousarray(center_crop(arr, size)) if resize == "crop" else arr


def decode_frames(mp4: bytes, indices: np.ndarray, size: int, resize: str = "squash",
                  fps: float | None = None, keyframe_interval: int | None = None,
                  threads: int = 1) -> np.ndarray:
    """Decode the frames at `indices` (sorted or not, repeats allowed) → uint8 [T, size, size, 3].

    Frame i is the i-th frame in display order. With a known fps and keyframe
    interval the decoder seeks past whole GOPs that hold no sampled frame.
    """
    want = np.asarray(indices)
    uniq = np.unique(want)
    got: dict[int, np.ndarray] = {}
    # one swscale context for the whole clip (frame.reformat builds a new one per frame, and a
    # thread pool with it): ~3x less CPU per converted frame, bit-identical output
    scaler = VideoReformatter()
    with av.open(io.BytesIO(mp4), mode="r") as container:
        stream = container.streams.video[0]
        cc = stream.codec_context
        if threads > 1:
            stream.thread_type, cc.thread_count = "AUTO", threads
        else:
            cc.thread_count = 1
        rate = fps or float(stream.average_rate or 0) or None
        tb = float(stream.time_base)
        w, h = output_size(cc.width, cc.height, size, resize)
        t0 = stream.start_time or 0
        pos = 0          # index of the next frame the decoder will return
        pending = list(uniq)
        gop = keyframe_interval if (keyframe_interval and rate) else None
        while pending:
            target = int(pending[0])
            if gop and (target // gop) * gop > pos:  # a whole GOP holds nothing we want: seek
                kf = (target // gop) * gop
                container.seek(t0 + int(round(kf / rate / tb)), stream=stream, backward=True)
                pos = None
            for frame in container.decode(stream):
                if pos is None:  # after a seek: the frame's own timestamp says where we are
                    pos = int(round((frame.pts - t0) * tb * rate)) if frame.pts is not None else target
                i = pos
                pos += 1
                if i < int(pending[0]):
                    continue  # decoded only to reach a later frame: no colour conversion
                # i >= the next wanted index (the clip may hold fewer frames than its json says)
                got[i] = scaler.reformat(frame, width=w, height=h, format="rgb24", threads=1).to_ndarray()
                while pending and int(pending[0]) <= i:
                    pending.pop(0)
                if not pending:
                    break
                if gop and (int(pending[0]) // gop) * gop > pos:
                    break  # the next wanted frame is in a later GOP: seek to it
            else:
                break  # end of stream
        if not got:
            raise ValueError("no frame decoded")
    # indices past the real end (json said more frames than decoded) fall back to the last frame
    avail = np.array(sorted(got))
    frames = [got[int(avail[min(np.searchsorted(avail, i, side="right") - 1, len(avail) - 1)])]
              if i not in got else got[int(i)] for i in want]
    out = np.stack(frames)
    if resize == "crop":
        out = center_crop(out, size)
    return out


def decode_all_reference(mp4: bytes) -> list[np.ndarray]:
    """Every frame as RGB at stored size, in display order (the simple test oracle)."""
    with av.open(io.BytesIO(mp4), mode="r") as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
