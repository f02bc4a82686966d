"""One prepared GPU check: every GPU number this project needs, in one command, within minutes.

    python bench/gpu.py --out DIR                        # the lent GPU machine: ≤ 8 min on one H200
    python bench/gpu.py --out DIR --quick                # ≤ 2 min
    python bench/gpu.py --out DIR --device cpu --quick   # CPU smoke (CI: tests/test_gpu_check.py)
    python bench/gpu.py --out DIR --parts device,attention

Parts, run in this order, each in its own try/except under its own time budget (a part that fails
or runs out of time is recorded with its traceback and the check goes on); DIR/gpu.json and
DIR/gpu.md (a markdown fragment: a table per part) are rewritten after every part, so a killed run
still leaves what it had measured:

1. device      versions (torch, CUDA, cuDNN, NCCL, driver, packages), device name and memory, and the
               measured matmul peak (bf16 8192³ on a GPU; `bench/train_step.matmul_peak_flops`): the
               MFU denominator.
2. train_step  the trainer's own step (`bench/train_step.bench_row`: `vip.train.engine.build_engine`
               + `train_step`), bf16, ZeRO-1, T=12 at 224²: ViT-B/32 and B/16, ViP and MeanPool at
               the largest micro-batch that fits (capped by --max-batch), gradient checkpointing off
               and on; clips/s, ViP/MeanPool ratio, MFU, peak memory. Also DIR/train_step.json in
               `bench/train_step.py`'s format (`bench/scaling.py --train` reads it).
3. attention   proxy-guided attention: the fast path vs the dense-mask oracle vs full attention
               (`bench/model.bench_arch`, forward+backward of the vision encoder, B/16 at T=12 and
               32); which SDPA backend each attention call can use (FLASH, EFFICIENT, CUDNN, MATH
               under `sdpa_kernel`, and what the default dispatch picks); the fast path's outputs
               vs the oracle's in bf16 and fp32; FlexAttention with the proxy-guided block mask
               (measured only, not used by the model).
4. data        the real StreamLoader with --data-workers workers on natural-texture synthetic shards
               of the default stored format (built in a temp dir), normalising on the device:
               clips/s per data core, and data cores per GPU = part 2's ViP B/32 clips/s ÷ that.
5. captioning  CoCa ViT-L/14 (random weights) captions/s, greedy and beam search, a few batch sizes;
               the Ray job's overhead only when `import ray` works. A failing `generate` (e.g. a
               transformers without the classes open_clip imports) is recorded, not fatal.
6. pretrain    a short real `python -m vip.train` (world 1: NCCL on a GPU, bf16, pinned memory) on
               tiny shards: run A for N steps; run B for N/2 steps, then B resumed to N; finite
               losses, the same samples, and the final weights compared byte for byte (on a GPU,
               bf16 kernels may legitimately differ: equality and the max abs diff are recorded).

`bench/record_gpu.py DIR/gpu.json` puts the numbers into docs/benchmarks.md and docs/scaling.md.
"""
