"""`vip finetune` end to end on a tiny synthetic retrieval set (one CPU process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch



@pytest.mark.slow
def test_finetune_selects_best_validation_epoch(tmp_path, palette, write_video, free_port):
    from vip.config import ModelConfig
    from vip.model import build_model
    from vip.model.convert import export
    vids = tmp_path / "videos"
    vids.mkdir()
    train, val = [], []
    for i, c in enumerate(list(palette)[:8]):
        for k in range(2):
            cid = f"{c}{k}"
            write_video(vids / f"{cid}.mp4", c, n=8 + k)
            row = {"clip_id": cid, "text": [f"a {c} square moves right", f"{c} box"]}
            (val if k == 1 and i < 4 else train).append(row)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    torch.manual_seed(0)
    cfg = ModelConfig(arch="vip-tiny", num_proxies=2, max_frames=4, init_logit_scale=2.66)
    export(build_model(cfg), cfg, tmp_path / "init")
    vip = str(Path(sys.executable).parent / "vip")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    # the finetune preset (default of `vip finetune`) + the shared optim/train/data sections
    args = [f"finetune.annotations={tmp_path}/train.jsonl", f"finetune.videos={vids}",
            f"finetune.val_annotations={tmp_path}/val.jsonl", f"train.init_from={tmp_path}/init",
            f"train.out={tmp_path}/ft", "finetune.epochs=3", "optim.lr=1e-3", "train.global_batch=4",
            "data.batch_size=4", "finetune.num_frames=4", "finetune.num_workers=1",
            "finetune.context_length=32"]
    p = subprocess.run([vip, "finetune", *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    saved = (tmp_path / "ft/config.yaml").read_text()
    assert "lr: 0.001" in saved and "weight_decay: 0.2" in saved          # preset + override, one config
    recs = [json.loads(x) for x in (tmp_path / "ft/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    sel = json.loads((tmp_path / "ft/best/selection.json").read_text())
    keys = [(r["val_t2v_R@1"], r["val_t2v_R@5"]) for r in recs]
    assert sel["epoch"] == 1 + keys.index(max(keys))            # chosen on validation, first best wins
    assert (tmp_path / "ft/best/model.safetensors").exists()
    import vip as vip_pkg
    m = vip_pkg.load(tmp_path / "ft/best")
    assert m.encode_text(["a red square moves right"]).shape == (1, 64)
