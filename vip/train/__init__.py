"""Training: one engine for every trainer.

runtime (rank, world, device, dtype) · engine (DeepSpeed engine from the config, `train_step`,
exports) · objectives (what a step optimises) · pretrain / finetune (the loops) · checkpoint
(DeepSpeed shards + exact resume state) · distributed (gather with gradients) · ds_config ·
optim (param groups, schedule) · logs (metrics, throughput) · launcher (entry points, signals).
"""
