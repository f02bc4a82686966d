"""Evaluation of vip models (docs/evaluation.md).

    metrics     R@K, MdR, MnR, DSL; the markdown table of results
    encode      the one encode loop (batches → features, gathered across ranks) and its batch sources
    models      the evaluated model (export or open_clip MeanPool baseline), runtime, required options
    retrieval   evaluate_shards (training), evaluate / run_eval (`vip eval`)
    videos      annotation jsonl + a video folder → decoded clips
    domain_gap  `vip analyze domain-gap` (K-means NMI between text corpora)
    heads       (moved to vip.model.heads: CLIP4Clip / X-CLIP / DRL retrieval heads)
"""
