"""`vip plot`: metrics.jsonl → PNG curves (loss terms, lr, logit scale, throughput, retrieval)."""
from __future__ import annotations

from pathlib import Path

from vip.train.logs import read_metrics


def plot_metrics(metrics: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = read_metrics(metrics)
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    panels = [("loss", [k for k in (train[0] if train else {}) if k.startswith("loss")]),
              ("lr", ["lr"]), ("logit_scale", ["logit_scale"]), ("samples/s", ["samples_per_s"]),
              ("data wait share", ["data_wait_share"])]
    eval_keys = [k for k in (evals[0] if evals else {}) if "R@" in k]
    n = len(panels) + (1 if eval_keys else 0)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            xs = [r["step"] for r in train if k in r]
            ax.plot(xs, [r[k] for r in train if k in r], label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if eval_keys:
        ax = axes[-1]
        for k in eval_keys:
            ax.plot([r["step"] for r in evals], [r[k] for r in evals], marker="o", label=k)
        ax.set_title("zero-shot retrieval")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out else Path(metrics).with_name("curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
