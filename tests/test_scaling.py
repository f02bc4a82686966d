"""bench/scaling.py's arithmetic: estimates from counted FLOPs, cores per GPU, the communication model,
and a GPU measurement taking precedence over the estimate."""
import pytest

from bench.scaling import Cluster, comm_seconds, cores_rows, loss_flops, node_rows, storage_rows, train_rates


def _train(device="cpu", clips_per_s=1.0, gflops=300.0):
    return {"info": {"device": device}, "rows": [
        {"arch": "vip-tiny", "encoder": "vip", "grad_ckpt": False, "batch": 64, "clips_per_s": clips_per_s,
         "gflops_per_clip": gflops},
        {"arch": "vip-tiny", "encoder": "vip", "grad_ckpt": True, "batch": 64, "clips_per_s": 9e9,
         "gflops_per_clip": gflops},            # checkpointing rows never feed the plan
        {"arch": "vip-tiny", "encoder": "meanpool", "grad_ckpt": False, "batch": 64, "clips_per_s": 9e9,
         "gflops_per_clip": gflops}]}


def _data():
    row = {"content": "natural", "label": "4 fps · 224 · gop 4 · fastdecode",
           "storage": {"bytes_per_13.4s_clip": 400e3, "mp4_kbit_per_s": 200.0},
           "worker": {"per_core": 50.0}, "loader": {"per_core": 25.0}}
    return {"formats": [row]}


def test_estimate_and_measurement():
    cl = Cluster(peak_tflops=800.0, mfu=0.5)
    est = train_rates([_train()], cl)["vip-tiny"]
    assert est["clips_per_s"] == pytest.approx(800e12 * 0.5 / 300e9) and "estimate" in est["source"]
    got = train_rates([_train(), _train("NVIDIA H100 80GB HBM3", clips_per_s=777.0)], cl)["vip-tiny"]
    assert got["clips_per_s"] == 777.0 and "measured on NVIDIA H100" in got["source"]
    assert got["params"] > 0 and got["embed_dim"] > 0


def test_cores_storage_and_nodes():
    cl = Cluster(peak_tflops=800.0, mfu=0.5, gpus_per_node=8, trainer_cores_per_gpu=1.0)
    rates = train_rates([_train()], cl)
    storage = storage_rows(_data())
    assert storage[0]["tb"] == pytest.approx(400e3 * 103e6 / 1e12) and storage[0]["shards"] == 103_000
    c = cores_rows(storage, rates, cl)[0]
    rate = rates["vip-tiny"]["clips_per_s"]
    assert c["cores_per_gpu"] == pytest.approx(rate / 50.0)
    assert c["cores_per_gpu_cpu_normalise"] == pytest.approx(rate / 25.0)
    assert c["node_cores_needed"] == pytest.approx(8 * (rate / 50.0 + 1.0))
    rows = node_rows("vip-tiny", rates["vip-tiny"], cl, storage[0], nodes=(1, 2, 4))
    assert [r["gpus"] for r in rows] == [8, 16, 32]
    for r in rows:   # compute scales down with GPUs; the epoch is steps × step time
        assert r["compute_ms"] == pytest.approx(1e3 * 1024 / r["gpus"] / rate)
        assert r["epoch_hours"] == pytest.approx(103e6 / 1024 * r["step_ms"] / 1e3 / 3600)
    # leaving the node (NVLink → InfiniBand share) makes gradient traffic slower although each GPU holds less
    assert rows[1]["grad_comm_ms"] > rows[0]["grad_comm_ms"]
    assert rows[2]["comm_share"] > rows[1]["comm_share"] > rows[0]["comm_share"]


def test_comm_model_and_loss_flops():
    cl = Cluster(nvlink_gbs=100.0, ib_gbs=10.0, gpus_per_node=8)
    assert comm_seconds(1e9, 1, cl) == 0
    assert comm_seconds(1e9, 8, cl) == pytest.approx(2 * 7 / 8 * 1e9 / 100e9)
    assert comm_seconds(1e9, 16, cl) == pytest.approx(2 * 15 / 16 * 1e9 / 10e9)
    # the loss is three G×G×D products, forward and backward: ~18 G² D, quadratic in G
    f = loss_flops(1024, 512)
    assert 12 * 1024 ** 2 * 512 < f < 30 * 1024 ** 2 * 512
    assert loss_flops(2048, 512) == pytest.approx(4 * f)


def test_inference_flop_counter_matches_torch():
    """bench/captioning.py counts generation FLOPs with its own dispatch mode (FlopCounterMode fails
    under no-grad generate): same formulas, same total on a model FlopCounterMode can run."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench.captioning import InferenceFlops
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    x = torch.randn(2, 10, 64)
    with FlopCounterMode(display=False) as ref:
        layer(x)
    for ctx in (torch.no_grad, torch.inference_mode):     # inference_mode: composite ops arrive undecomposed
        with ctx(), InferenceFlops() as got:
            layer(x)
        assert got.total == ref.get_total_flops() > 2 * 2 * 10 * 64 * 128


def test_caption_rows_estimate_from_flops_and_measure_from_a_gpu_run():
    from bench.scaling import caption_plan
    cl = Cluster(peak_tflops=800.0, caption_mfu=0.1)
    flops = {"arch": "coca_ViT-L-14", "decoding": "beam", "num_beams": 6, "max_tokens": 30, "gflops_per_caption": 800.0}
    gpu = {"args": {"device": "cuda", "arch": "coca_ViT-L-14", "model": None, "decoding": "beam", "max_tokens": 30},
           "job": {"steady_captions_per_s": 400.0, "actors": 8},
           "alone": {"provenance": {"generation": {"decoding": "beam", "num_beams": 6}}}}
    cpu = {**gpu, "args": {**gpu["args"], "device": "cpu"}}
    est, meas = caption_plan([flops, gpu, cpu], cl)          # a CPU timing is no GPU figure: left out
    assert est["captions_per_s"] == pytest.approx(100.0) and "estimate" in est["source"]
    assert meas["captions_per_s"] == pytest.approx(50.0) and meas["source"].startswith("measured")
    assert meas["num_beams"] == 6
    assert meas["gpu_hours"] == pytest.approx(103e6 / 50 / 3600)
