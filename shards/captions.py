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
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shards import storage

SCHEMA = pa.schema([
    ("key", pa.string()), ("caption", pa.string()), ("model", pa.string()), ("model_tag", pa.string()),
    ("generation", pa.string()), ("created_at", pa.timestamp("us", tz="UTC")), ("error", pa.string()),
])


def sidecar_path(captions_dir: str | Path, shard: str) -> str | Path:
    """captions/<shard stem>.parquet for shard 'shard-000012.tar' (a Path, or a URL string)."""
    path = storage.join(str(captions_dir), storage.basename(str(shard)).replace(".tar", "") + ".parquet")
    return path if storage.is_remote(path) else Path(path)


def write_sidecar(path: str | Path, rows: list[dict], model: str, model_tag: str = "",
                  generation: dict | None = None) -> None:
    """rows: [{"key", "caption" (str|None), "error" (str|None, optional)}] → parquet, atomically
    (a local path: temporary name + rename; a URL: one PUT)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    gen = json.dumps(generation or {}, sort_keys=True)
    table = pa.Table.from_pylist([
        {"key": r["key"], "caption": r.get("caption"), "model": model, "model_tag": model_tag,
         "generation": gen, "created_at": now, "error": r.get("error")} for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(str(path), buf.getvalue())


def count_sidecars(shards_dir: str | Path, captions_dir: str | Path | None = None) -> int:
    """How many shards of the set in `shards_dir` have a caption sidecar in `captions_dir`
    (default `<shards_dir>/captions`, the reader's and the captioning job's default).

    The shard set is `shards.json` (written by the builder), else the `shard-*.tar` files; a
    parquet that belongs to no shard of the set is not counted. 0 when nothing was captioned
    (or the folder holds no shards): a caption loss would then see no caption at all. One
    directory listing, whatever the number of shards."""
    root = str(shards_dir)
    cap_dir = str(captions_dir) if captions_dir else storage.join(root, "captions")
    if not storage.is_remote(cap_dir) and not Path(cap_dir).is_dir():
        return 0
    try:
        names = [s["name"] for s in json.loads(storage.read_bytes(storage.join(root, "shards.json"))).get("shards", [])]
    except FileNotFoundError:
        names = sorted(n for n in (storage.listdir(root) or []) if n.startswith("shard-") and n.endswith(".tar"))
    wanted = [storage.basename(sidecar_path(cap_dir, name)) for name in names]
    present = storage.listdir(cap_dir)
    if present is None:                  # a store that cannot list (plain HTTP): ask for each
        return sum(storage.exists(storage.join(cap_dir, w)) for w in wanted)
    present = set(present)
    return sum(w in present for w in wanted)


def read_sidecar(path: str | Path, opts: storage.IOOptions = storage.DEFAULT) -> dict[str, str]:
    """key → caption for rows with a non-empty caption; {} when the sidecar does not exist."""
    try:
        data = storage.read_bytes(str(path), opts)
    except (FileNotFoundError, IsADirectoryError):
        return {}
    table = pq.read_table(io.BytesIO(data), columns=["key", "caption"])
    out = {}
    for key, cap in zip(table.column("key").to_pylist(), table.column("caption").to_pylist()):
        if isinstance(cap, str) and cap.strip():
            out[key] = cap.strip()
    return out
