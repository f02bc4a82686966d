"""Gathered-loss gradients: 2 real gloo ranks (DDP-style averaging) == 1 process on the global batch.

The encoders are a small pure-torch stand-in with CLIPViP's forward contract (importing
open_clip in every spawned rank would cost more than the test); what is under test is
gather_features + ocl_loss + rank averaging, which only see features."""
import os

import torch
import torch.nn.functional as F

from vip.train.distributed import gather_features

B_GLOBAL, WORLD = 6, 2


class _Tiny(torch.nn.Module):
    """video/frame share one 'vision tower', subtitle/caption one 'text tower', + logit_scale."""

    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Sequential(torch.nn.Linear(3 * 8 * 8, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.temporal = torch.nn.Parameter(torch.randn(2, 3 * 8 * 8) * 0.1)
        self.text = torch.nn.EmbeddingBag(100, 16)
        self.text_proj = torch.nn.Linear(16, 16)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, video, frame, subtitle, caption):
        v = self.vision(video.flatten(2) + self.temporal).mean(1)
        f = self.vision(frame.flatten(1) + self.temporal.mean(0))
        s, c = (self.text_proj(self.text(t)) for t in (subtitle, caption))
        return {**{k: F.normalize(x, dim=-1) for k, x in zip(("video", "frame", "subtitle", "caption"), (v, f, s, c))},
                "logit_scale": self.logit_scale.clamp(0, 5.3)}


def _batch():
    g = torch.Generator().manual_seed(123)
    return {"video": torch.randn(B_GLOBAL, 2, 3, 8, 8, generator=g),
            "frame": torch.randn(B_GLOBAL, 3, 8, 8, generator=g),
            "subtitle": torch.randint(0, 100, (B_GLOBAL, 5), generator=g),
            "caption": torch.randint(0, 100, (B_GLOBAL, 5), generator=g),
            "has_caption": torch.tensor([True, False, True, True, False, True])}


def _step(model, batch):
    """The trainer's compute_loss: forward, gather every feature, OCL loss 'd', backward."""
    from vip.losses import ocl_loss
    out = model(video=batch["video"], frame=batch["frame"], subtitle=batch["subtitle"], caption=batch["caption"])
    feats = {k: gather_features(out[k]) for k in ("video", "frame", "subtitle", "caption")}
    loss, _ = ocl_loss("d", **feats, has_caption=gather_features(batch["has_caption"]),
                       logit_scale=out["logit_scale"])
    loss.backward()
    return loss.detach()


def _model():
    torch.manual_seed(0)
    return _Tiny()


def _worker(rank, port, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        b = B_GLOBAL // WORLD
        local = {k: v[rank * b:(rank + 1) * b] for k, v in _batch().items()}
        gathered_mask = gather_features(local["has_caption"])
        loss = _step(model, local)
        grads = {}
        for n, p in model.named_parameters():                  # DDP / DeepSpeed: average over ranks
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            grads[n] = g / WORLD
        torch.save({"loss": loss, "grads": grads, "mask": gathered_mask}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_single_process_gather_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features(x) is x and gather_features(None) is None


def test_two_rank_gradients_equal_single_process(free_port, tmp_path):
    import torch.multiprocessing as mp
    model = _model()
    ref_loss = _step(model, _batch())
    ref = {n: p.grad for n, p in model.named_parameters()}
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(res["mask"], _batch()["has_caption"])
        torch.testing.assert_close(res["loss"], ref_loss, rtol=1e-5, atol=1e-6)
        checked = 0
        for n, g in res["grads"].items():
            if ref[n] is None:
                assert g.abs().max() == 0, n
                continue
            scale = ref[n].abs().max().clamp_min(1e-8)
            assert ((g - ref[n]).abs().max() / scale).item() < 1e-4, n
            checked += 1
        assert checked == len(ref)
