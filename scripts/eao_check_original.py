"""The original Everything-at-Once code vs vip's fusion head and combinatorial loss, same weights.

    git clone https://github.com/ninatu/everything_at_once /tmp/eao      # (or any checkout of it)
    PYTHONPATH=. .venv/bin/python scripts/eao_check_original.py /tmp/eao

Loads the original's EverythingAtOnceModel (DAVEnet replaced by the identity: audio tokens are given)
and CombinatorialLoss (needs timm; timm ≥ 1 lacks the old `_init_vit_weights`, shimmed below), copies
vip's FusionHead weights into it (the same parameter names; only the original's unused final `norm`
is extra) and prints the largest difference of the six embeddings and of the loss on clips with
padded text, missing audio and partly padded audio. Not a test: tests must not need the original
repository (docs/fusion.md records the result).
"""
import sys

import torch
import torch.nn.functional as F
import timm.models.vision_transformer as tvit  # noqa: E402
def _old_init(m):   # timm 0.4's _init_vit_weights (the weights are replaced by vip's below anyway)
    if isinstance(m, torch.nn.Linear):
        torch.nn.init.trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            torch.nn.init.zeros_(m.bias)
tvit._init_vit_weights = _old_init
sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "everything_at_once")
from everything_at_once.loss.combinatorial_loss import CombinatorialLoss  # noqa: E402
from everything_at_once.model.fusion_model import EverythingAtOnceModel  # noqa: E402

from vip.losses import combinatorial_loss  # noqa: E402
from vip.model.fusion import FusionHead  # noqa: E402

torch.manual_seed(0)
B, Dt, Dv, Da, E, P = 5, 10, 12, 1024, 32, 24
orig = EverythingAtOnceModel(video_embed_dim=Dv, text_embed_dim=Dt, davenet_v2=False,
                             fusion_params=dict(embed_dim=E, depth=2, num_heads=4, mlp_ratio=1, use_cls_token=False),
                             projection_dim=P, token_projection="gated", projection="gated",
                             individual_projections=True, use_positional_emb=False).eval()
orig.davenet = torch.nn.Identity()
mine = FusionHead({"t": Dt, "v": Dv, "a": Da}, dim=E, depth=2, num_heads=4, mlp_ratio=1.0, projection_dim=P).eval()
missing, unexpected = orig.load_state_dict(mine.state_dict(), strict=False)
print("orig params not in mine:", [k for k in missing if not k.startswith("davenet")], "mine not in orig:", unexpected)
text, tmask = torch.randn(B, 7, Dt), torch.tensor([[1] * 5 + [0] * 2] * B, dtype=torch.float)
video, vmask = torch.randn(B, 4, Dv), torch.ones(B, 4)
audio, amask = torch.randn(B, 6, Da), torch.tensor([[1] * 6, [0] * 6, [1] * 4 + [0] * 2, [1] * 6, [0] * 6],
                                                     dtype=torch.float)
with torch.no_grad():
    o = orig({"text": text, "text_mask": tmask.clone(), "video": video, "video_mask": vmask.clone(),
              "audio": audio.permute(0, 2, 1), "audio_mask": amask.clone(), "audio_STFT_nframes": torch.full((B,), 6)})
    m = mine({"t": (text, tmask.bool()), "v": (video, vmask.bool()), "a": (audio, amask.bool())})
worst = 0.0
for k, ok in (("t", "text_embed"), ("v", "video_embed"), ("a", "audio_embed"), ("tv", "tv_embed"), ("va", "va_embed"),
              ("ta", "ta_embed")):
    d = (F.normalize(o[ok], dim=-1) - m[k]).abs().max().item()
    worst = max(worst, d)
    print(f"{k:3s} max |orig − vip| = {d:.2e}")
print("present_a", m["present_a"].tolist(), o["audio_nonempty_input_mask"].tolist())
# loss on these embeddings, weights of everything_at_once_tva
lo, _ = CombinatorialLoss(tv_weight=1, ta_weight=0.1, va_weight=0.1, t_va_weight=0.1, v_ta_weight=0.1,
                          a_tv_weight=0.1)(o)
lm, _ = combinatorial_loss({k: m[k] for k in ("t", "v", "a", "tv", "va", "ta")},
                           {x: m[f"present_{x}"] for x in "tva"})
print(f"loss orig {lo.item():.6f} vip {lm.item():.6f} |diff| {abs(lo.item() - lm.item()):.2e}; worst embedding {worst:.2e}")
assert worst < 1e-5 and abs(lo.item() - lm.item()) < 1e-5, "vip differs from the original"
