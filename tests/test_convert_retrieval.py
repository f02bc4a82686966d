"""Import of released CLIP4Clip / X-CLIP / DRL checkpoints, from tiny synthetic state dicts written
key by key in the originals' layouts (saved as a .bin, read without unpickling code)."""
from __future__ import annotations

import pytest
import torch

D, LAYERS, WORDS, FRAMES = 64, 2, 16, 4


def clip_part(g):
    """An OpenAI-layout CLIP (random, the vip-tiny-quickgelu shapes) under ``clip.``."""
    import open_clip

    from vip.model.archs import clip_config
    torch.manual_seed(int(torch.randint(0, 1000, (1,), generator=g)))
    m = open_clip.CLIP(**clip_config("vip-tiny-quickgelu"))
    sd = {f"clip.{k}": v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in m.state_dict().items()}
    sd.update({"clip.input_resolution": torch.tensor(64), "clip.context_length": torch.tensor(77),
               "clip.vocab_size": torch.tensor(49408)})                # OpenAI's JIT archives carry these
    return sd


def temporal_part(g, layers=LAYERS):
    """CLIP4Clip's seqTransf tensors: frame_position_embeddings + transformerClip.resblocks.i.*."""
    r = lambda *s: torch.randn(*s, generator=g)                        # noqa: E731
    sd = {"frame_position_embeddings.weight": r(77, D)}
    for i in range(layers):
        p = f"transformerClip.resblocks.{i}."
        sd.update({p + "attn.in_proj_weight": r(3 * D, D), p + "attn.in_proj_bias": r(3 * D),
                   p + "attn.out_proj.weight": r(D, D), p + "attn.out_proj.bias": r(D),
                   p + "ln_1.weight": r(D), p + "ln_1.bias": r(D), p + "ln_2.weight": r(D), p + "ln_2.bias": r(D),
                   p + "mlp.c_fc.weight": r(4 * D, D), p + "mlp.c_fc.bias": r(4 * D),
                   p + "mlp.c_proj.weight": r(D, 4 * D), p + "mlp.c_proj.bias": r(D)})
    return sd


def layout(kind, g):
    sd = clip_part(g)
    r = lambda *s: torch.randn(*s, generator=g)                        # noqa: E731
    if kind in ("clip4clip_seqtransf", "xclip", "drl"):
        sd.update(temporal_part(g))
    if kind == "xclip":
        sd.update({"global_mat_weight": r(D, D), "local_mat_weight": r(D, D), "word_logit_weight": r(WORDS, WORDS),
                   "word_mat_weight": r(WORDS, WORDS), "word_mat_weight2": r(WORDS, WORDS),
                   "frame_logit_weight": r(FRAMES, FRAMES), "frame_mat_weight": r(FRAMES, FRAMES),
                   "frame_mat_weight2": r(FRAMES, FRAMES)})
    if kind == "drl":
        for side in ("text", "video"):
            sd.update({f"{side}_weight_fc.0.weight": r(D, D), f"{side}_weight_fc.0.bias": r(D),
                       f"{side}_weight_fc.2.weight": r(1, D), f"{side}_weight_fc.2.bias": r(1)})
    return {f"module.{k}": v for k, v in sd.items()}                    # saved from a DDP-wrapped model


@pytest.mark.parametrize("kind,head", [("clip4clip_meanp", "meanp"), ("clip4clip_seqtransf", "seqtransf"),
                                       ("xclip", "xclip"), ("drl", "drl")])
def test_import_round_trips(tmp_path, kind, head):
    from vip.model.convert import export, load, read_head_spec
    from vip.model.convert_retrieval import import_retrieval_checkpoint, to_original_layout
    g = torch.Generator().manual_seed(7)
    sd = layout(kind, g)
    torch.save(sd, tmp_path / "pytorch_model.bin.1")
    model, cfg = import_retrieval_checkpoint(tmp_path / "pytorch_model.bin.1", num_frames=FRAMES)
    assert cfg.arch == "vip-tiny-quickgelu" and cfg.video_encoder == "meanpool" and model.head.spec["name"] == head
    back = to_original_layout(model)
    want = {k[len("module."):]: v for k, v in sd.items() if k.split(".")[-1] not in
            ("input_resolution", "context_length", "vocab_size")}
    assert set(back) == set(want)
    for k, v in want.items():
        assert torch.equal(back[k], v), k
    # the imported model scores with its head, exports and reloads with it
    frames, _ = model.encode_video_frames(torch.randn(2, FRAMES, 3, 64, 64))
    toks = torch.zeros(3, WORDS, dtype=torch.long)
    toks[:, 0], toks[:, 1:4], toks[:, 4] = 49406, 320, 49407
    s, w, wm = model.encode_text_tokens(toks)
    sim = model.head(s, w, wm, frames, torch.ones(2, FRAMES))
    export(model, cfg, tmp_path / "exp")
    assert read_head_spec(tmp_path / "exp")["name"] == head
    again = load(tmp_path / "exp")
    torch.testing.assert_close(again.head(s, w, wm, frames, torch.ones(2, FRAMES)), sim)


def test_import_reads_the_head_weights_into_the_right_places():
    from vip.model.convert_retrieval import import_retrieval_checkpoint
    sd = layout("xclip", torch.Generator().manual_seed(1))
    model, _ = import_retrieval_checkpoint(sd, num_frames=FRAMES)
    h = model.head
    assert torch.equal(h.word_mat_weight2, sd["module.word_mat_weight2"])
    assert torch.equal(h.temporal.transformerClip.resblocks[1].mlp.c_fc.weight,
                       sd["module.transformerClip.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(model.visual.proj, sd["module.clip.visual.proj"])
    assert h.spec["num_words"] == WORDS and h.spec["context_length"] == WORDS and h.temporal.heads == 1


def test_unsupported_layouts_are_clear_errors():
    from vip.model.convert_retrieval import import_retrieval_checkpoint
    g = torch.Generator().manual_seed(2)
    sd = clip_part(g)
    with pytest.raises(NotImplementedError, match="cross-encoder"):
        import_retrieval_checkpoint({**sd, "cross.pooler.dense.weight": torch.zeros(D, D)})
    with pytest.raises(NotImplementedError, match="wti_arch"):
        import_retrieval_checkpoint({**sd, "text_weight_fc.weight": torch.zeros(1, D)})
