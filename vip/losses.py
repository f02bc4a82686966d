"""Omnisource cross-modal learning (OCL) losses of CLIP-ViP (docs/model.md, "Losses").

Pure functions of already-gathered, L2-normalised features [B, D] (B = global batch):
V = video, F = middle frame, S = subtitle, C = auxiliary caption. Logits are
``exp(logit_scale) · cosine`` (logit_scale in log space, kept in [0, ln 200] by the trainer).
Everything is computed in float32 whatever the feature dtype (bf16-safe).

Conventions (the reference's: cross-entropy terms are summed):

* ``CE(logits)`` = mean over rows of the cross-entropy with the diagonal as target.
* ``L_X↔Y = CE(X→Y) + CE(Y→X)`` — the two directions are summed, not averaged.
* ``L_V↔S,C = CE(S→V) + CE(C→V) + CE_S(V→S,C) + CE_C(V→S,C)``: text→video are ordinary
  InfoNCE over subtitles and over captions; in video→text each video has two positives (its
  subtitle, its caption), each scored in its own softmax over all subtitles and all
  captions with the *other* positive left out.
* A variant's total is the sum of its terms:
  ``vs`` = L_V↔S;  ``a`` = L_V↔S + L_F↔C;  ``b`` = L_V↔S + L_V↔C;
  ``c`` = L_V↔S + L_V↔C + L_F↔C;  ``d`` = L_V↔S,C + L_F↔C (default).

Missing captions (``has_caption`` False): the clip drops out of every caption term — its
caption row and column are removed (caption terms run on the captioned sub-batch; in the
V→(S,C) softmax its caption is not a candidate, while its video still scores its subtitle).
A caption term with no captioned clip is 0. Placeholder captions never enter a softmax.

Distributed training: gather features with `vip.train.distributed.gather_features` (gradients
flow back to each rank's local slice, summed over ranks) and let every rank compute this
same global loss; DDP/DeepSpeed then *average* gradients over ranks, which gives exactly the
single-process gradient of the global-batch loss (tests/test_gather.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

VARIANTS = {
    "vs": ("vs",),
    "a": ("vs", "fc"),
    "b": ("vs", "vc"),
    "c": ("vs", "vc", "fc"),
    "d": ("vsc", "fc"),
}


def ce_diag(logits: Tensor) -> Tensor:
    """Mean cross-entropy of rows of a square [n, n] logit matrix, targets on the diagonal (0 if n = 0)."""
    n = logits.shape[0]
    if n == 0:
        return logits.new_zeros(())
    return F.cross_entropy(logits, torch.arange(n, device=logits.device))


def clip_loss(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """Symmetric InfoNCE L_X↔Y = CE(X→Y) + CE(Y→X). x, y: [n, D] normalised; scale = exp(logit_scale)."""
    logits = scale * x.float() @ y.float().T                               # [n, n]
    return ce_diag(logits) + ce_diag(logits.T)


def video_subtitle_caption_loss(video: Tensor, subtitle: Tensor, caption: Tensor, has_caption: Tensor,
                                scale: Tensor) -> Tensor:
    """L_V↔S,C (see the module docstring). video, subtitle, caption: [B, D]; has_caption: [B] bool."""
    v, s = video.float(), subtitle.float()
    keep = has_caption.bool()
    c = caption.float()[keep]                                              # [K, D] real captions only
    B, K = v.shape[0], c.shape[0]
    v_s = scale * v @ s.T                                                  # [B, B]  video × subtitle
    v_c = scale * v @ c.T                                                  # [B, K]  video × caption
    # text → video: ordinary InfoNCE (captions: the captioned clips only)
    loss = ce_diag(v_s.T) + ce_diag(v_c[keep].T)
    # video → [all subtitles, all captions], two positives, each without the other
    logits = torch.cat([v_s, v_c], dim=1)                                  # [B, B+K]
    rows = torch.arange(B, device=v.device)
    cap_col = B + torch.cumsum(keep.long(), 0) - 1                         # column of clip i's caption (if any)
    blocked = torch.zeros(B, B + K, dtype=torch.bool, device=v.device)
    blocked[rows[keep], cap_col[keep]] = True                              # subtitle softmax: hide own caption
    loss = loss + F.cross_entropy(logits.masked_fill(blocked, float("-inf")), rows)
    if K:
        blocked = torch.zeros(K, B + K, dtype=torch.bool, device=v.device)
        blocked[torch.arange(K, device=v.device), rows[keep]] = True       # caption softmax: hide own subtitle
        loss = loss + F.cross_entropy(logits[keep].masked_fill(blocked, float("-inf")), cap_col[keep])
    return loss


def ocl_loss(variant: str, *, video: Tensor, subtitle: Tensor, logit_scale: Tensor, frame: Tensor | None = None,
             caption: Tensor | None = None, has_caption: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """OCL loss of a variant (vs | a | b | c | d) on gathered features.

    video, frame, subtitle, caption: [B, D] L2-normalised; has_caption: [B] bool (None: all
    captioned); logit_scale: scalar, log space. Returns (total, {term: detached value}) with
    terms among vs (L_V↔S), vc (L_V↔C), fc (L_F↔C), vsc (L_V↔S,C)."""
    if variant not in VARIANTS:
        raise ValueError(f"loss variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    terms = VARIANTS[variant]
    if variant != "vs" and caption is None:
        raise ValueError(f"loss variant {variant!r} needs caption features")
    if "fc" in terms and frame is None:
        raise ValueError(f"loss variant {variant!r} needs frame features")
    scale = logit_scale.float().exp()
    B = video.shape[0]
    if has_caption is None:
        has_caption = torch.ones(B, dtype=torch.bool, device=video.device)
    keep = has_caption.bool()
    out: dict[str, Tensor] = {}
    for t in terms:
        if t == "vs":
            out[t] = clip_loss(video, subtitle, scale)
        elif t == "vc":
            out[t] = clip_loss(video[keep], caption[keep], scale)
        elif t == "fc":
            out[t] = clip_loss(frame[keep], caption[keep], scale)
        else:  # vsc
            out[t] = video_subtitle_caption_loss(video, subtitle, caption, keep, scale)
    total = sum(out.values())
    return total, {k: v.detach() for k, v in out.items()}


# --------------------------------------------------------------------------- Everything at Once
# Combinatorial loss of Everything at Once (Shvetsova et al., CVPR 2022; docs/fusion.md). The
# original (ninatu/everything_at_once, loss/combinatorial_loss.py) scores every pair among the six
# embeddings below with NormSoftmax NCE and divides the weighted sum by the sum of the weights.
EAO_TERMS = ("t_v", "t_a", "v_a", "t_va", "v_ta", "a_tv")       # (x, y) of each term: split on "_"
EAO_WEIGHTS = (1.0, 0.1, 0.1, 0.1, 0.1, 0.1)                     # everything_at_once_tva.yaml


def norm_softmax_nce(x: Tensor, y: Tensor, temperature: float = 0.05) -> Tensor:
    """Symmetric NormSoftmax NCE between rows of x and y ([n, D], any norm: cosine is used).

    = −mean_i log softmax_j(cos(x_i, y_j)/τ)[i] − mean_j log softmax_i(cos(x_i, y_j)/τ)[j]
    (the two directions summed, as the original's NormSoftmaxLoss). 0 when n = 0."""
    if x.shape[0] == 0:
        return x.new_zeros((), dtype=torch.float32)
    x = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)    # the original's eps
    y = y.float() / y.float().norm(dim=-1, keepdim=True).clamp_min(1e-8)
    logits = x @ y.T / temperature                                          # [n, n]
    return ce_diag(logits) + ce_diag(logits.T)


def combinatorial_loss(emb: dict[str, Tensor], present: dict[str, Tensor], *,
                       weights: tuple[float, ...] = EAO_WEIGHTS, temperature: float = 0.05,
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """L = Σ_k λ_k·NCE_k / Σ_k λ_k over k ∈ EAO_TERMS (weights in that order).

    emb: {"t", "v", "a", "tv", "va", "ta"} → [B, D] gathered embeddings; present: {"t", "v", "a"}
    → bool [B], the clips that have that modality. Term x_y runs on the clips that have every
    modality x and y use (their rows and columns only: an absent modality is never a negative);
    a term whose embeddings are missing from `emb` or whose weight is 0 is left out of both sums,
    as in the original. A term with no clip left contributes 0 (its weight stays in the sum).
    Returns (total, {term: detached value})."""
    if len(weights) != len(EAO_TERMS):
        raise ValueError(f"need {len(EAO_TERMS)} weights ({', '.join(EAO_TERMS)}), got {len(weights)}")
    total, wsum, terms = None, 0.0, {}
    for name, w in zip(EAO_TERMS, weights):
        x, y = name.split("_")
        if w == 0 or x not in emb or y not in emb:
            continue
        keep = torch.ones(emb[x].shape[0], dtype=torch.bool, device=emb[x].device)
        for m in x + y:                                                     # modalities the term needs
            keep = keep & present[m].to(keep.device).bool()
        loss = norm_softmax_nce(emb[x][keep], emb[y][keep], temperature)
        terms[name] = loss.detach()
        total = w * loss if total is None else total + w * loss
        wsum += w
    if total is None:
        raise ValueError("combinatorial_loss: no term has both embeddings and a non-zero weight")
    return total / wsum, terms
