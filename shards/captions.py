"""Caption sidecars: `captions/shard-%06d.parquet`, one per video shard.

Columns (docs/data_format.md, "Caption sidecars"): key (str), caption (str, null when captioning failed),
model (str), model_tag (str: weights tag or file hash), generation (str: JSON
of the generation settings), created_at (timestamp, UTC), error (str, null
unless captioning failed). Written atomically by the captioning job; read per
shard by the streaming reader, which joins by key. A clip with no row, a null
or an empty caption has no caption (`has_caption` False).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards.atomic import atomic_path

SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("model", pa.string()), ("model_tag", pa.string()),
    ("generation", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("error", pa.string()),
])


def sidecar_path(captions_dir: str | Path, shard: str) -> Path:
    """captions/<shard stem>.parquet for shard 'shard-000012.tar'."""
    return Path(captions_dir) / (Path(shard).name.replace(".tar", "") + ".parquet")


def write_sidecar(path: str | Path, rows: list[dict], model: str, model_tag: str = "",
                  generation: dict | None = None) -> None:
    """rows: [{"key", "caption" (str|None), "error" (str|None, optional)}] → parquet, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    gen = json.dumps(generation or {}, sort_keys=True)
    table = pa.Table.from_pylist([
        {"key": r["key"], "caption": r.get("caption"), "model": model, "model_tag": model_tag,
         "generation": gen, "created_at": now, "error": r.get("error")} for r in rows], schema=SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def count_sidecars(shards_dir: str | Path, captions_dir: str | Path | None = None) -> int:
    """How many shards of the set in `shards_dir` have a caption sidecar in `captions_dir`
    (default `<shards_dir>/captions`, the reader's and the captioning job's default).

    The shard set is `shards.json` (written by the builder), else the `shard-*.tar` files; a
    parquet that belongs to no shard of the set is not counted. 0 when nothing was captioned
    (or the folder holds no shards): a caption loss would then see no caption at all. One
    directory listing, whatever the number of shards."""
    root = Path(shards_dir)
    cap_dir = Path(captions_dir) if captions_dir else root / "captions"
    if not cap_dir.is_dir():
        return 0
    index = root / "shards.json"
    if index.is_file():
        names = [s["name"] for s in json.loads(index.read_text()).get("shards", [])]
    else:
        names = [p.name for p in root.glob("shard-*.tar")]
    present = {p.name for p in cap_dir.iterdir() if p.is_file()}
    return sum(sidecar_path(cap_dir, name).name in present for name in names)


def read_sidecar(path: str | Path) -> dict[str, str]:
    """key → caption for rows with a non-empty caption; {} when the sidecar does not exist."""
    path = Path(path)
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["key", "caption"])
    out = {}
    for key, cap in zip(table.column("key").to_pylist(), table.column("caption").to_pylist()):
        if isinstance(cap, str) and cap.strip():
            out[key] = cap.strip()
    return out
