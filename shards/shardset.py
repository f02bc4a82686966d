"""A shard set as the reader and the captioning job see it: names and sample counts
(`shards.json`, else the tars' member indexes), and the build record's stored aspect, checked
before any sample is read. The set may live in a local folder or on object storage
(shards/storage.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from shards import storage
from shards.plan import ShardSet
from shards.tarindex import open_index

log = logging.getLogger("shards.reader")


_warned_once: set = set()


def _warn_once(key: tuple, msg: str, *args) -> None:
    """log.warning once per process for `key` (a shard set is loaded by every loader and eval)."""
    if key not in _warned_once:
        _warned_once.add(key)
        log.warning(msg, *args)


def _root_id(root: str) -> str:
    return root if storage.is_remote(root) else str(Path(root).resolve())


def load_shardset(root: str | Path, opts: storage.IOOptions = storage.DEFAULT) -> ShardSet:
    """Shard names and counts from shards.json (written by the builder); else by indexing the tars.

    `root` is a local folder or a URL (s3://, gs://, http(s)://: shards/storage.py).
    0-sample shards (every clip of the shard skipped at build time) are dropped from the set
    (`ShardSet.empty` names them; logged once): they hold nothing to plan, read or caption."""
    root = storage.check_url(str(root))
    try:
        data = json.loads(storage.read_bytes(storage.join(root, "shards.json"), opts))
    except FileNotFoundError:
        data = None
    if data is not None:
        names = tuple(s["name"] for s in data["shards"])
        counts = tuple(int(s["num_samples"]) for s in data["shards"])
    else:
        tars = sorted(n for n in (storage.listdir(root, opts) or []) if n.startswith("shard-") and n.endswith(".tar"))
        if tars:
            _warn_once(("no_shards_json", _root_id(root)),
                       "%s has no shards.json: indexing %d tars to count their samples (the build is incomplete "
                       "— re-run `vip shards build` to finish it and write shards.json — or this is a shard set "
                       "not written by vip shards build)", storage.display(root), len(tars))
        names = tuple(tars)
        counts = tuple(len(open_index(storage.join(root, t), opts)) for t in tars)
    if not names:
        raise FileNotFoundError(f"no shards in {storage.display(root)} (expected shards.json or shard-*.tar)")
    shards = ShardSet(root=root, names=names, counts=counts).without_empty()
    if not shards.names:
        raise ValueError(f"every shard in {root} is empty ({len(names)} shards, 0 samples): "
                         "every clip was skipped at build time (see the build summary)")
    if shards.empty:
        _warn_once(("empty_shards", _root_id(root), len(shards.empty)),
                   "%s: %d of %d shards have no samples (every clip skipped at build time): dropped from the "
                   "shard set (%s%s)", root, len(shards.empty), len(names), ", ".join(shards.empty[:5]),
                   ", …" if len(shards.empty) > 5 else "")
    return shards


def stored_aspect(root: str | Path, opts: storage.IOOptions = storage.DEFAULT) -> str | None:
    """The `aspect` the shard set was built with (`build_config.yaml`, written by the builder):
    "square" or "keep"; None when the folder has no readable build record (older shard sets)."""
    path = storage.join(root, "build_config.yaml")
    import yaml
    try:
        data = yaml.safe_load(storage.read_text(path, opts))
    except (FileNotFoundError, IsADirectoryError):
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("%s: unreadable (%s): the stored aspect is not checked at open time", path, e)
        return None
    aspect = data.get("aspect") if isinstance(data, dict) else None
    return aspect if isinstance(aspect, str) else None


def check_resize(root: str | Path, resize: str, opts: storage.IOOptions = storage.DEFAULT) -> None:
    """Refuse, before any sample is read, a read mode the stored clips cannot give: square-stored
    clips (build.aspect=square) are already squashed, so a crop would crop a distorted image."""
    if resize == "crop" and stored_aspect(root, opts) == "square":
        raise ValueError(f"shards in {root} were built with build.aspect=square (clips already squashed "
                         f"to short_side²), so they cannot be read with data.resize=crop: read them with "
                         f"data.resize=squash, or rebuild them with build.aspect=keep")
