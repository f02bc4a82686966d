"""Checkpoint verification: every file of a tag with its size and CRC32, checked before a resume
and by `vip checkpoints verify RUN`.

A tag's `COMPLETE` marker (JSON, written last by rank 0) holds `step`, `time`, `world`,
`checksum` ("crc32") and `files`: one record per file of the folder, `{"path": relative path,
"bytes": size, "crc32": 8 hex digits, "rank": the rank that wrote it}`. Markers written before
file lists existed have no `files`: such a tag is "unverified" (accepted, with a warning).

No torch here: `vip checkpoints verify` stays quick to start.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

MARKER = "COMPLETE"
CHECKSUM = "crc32"
BLOCK = 8 << 20           # read in 8 MiB blocks


def crc32_file(path: str | Path) -> str:
    """CRC32 of a file, streamed (zlib.crc32: ~5 GB/s, catches truncation and flipped bytes)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def file_record(tag_dir: str | Path, path: str | Path, rank: int) -> dict:
    """The marker record of one file of a tag folder (size + checksum, read once now)."""
    path = Path(path)
    return {"path": path.relative_to(tag_dir).as_posix(), "bytes": path.stat().st_size,
            CHECKSUM: crc32_file(path), "rank": rank}


def check_file(tag_dir: str | Path, rec: dict) -> str | None:
    """What is wrong with one recorded file (missing / size / checksum / unreadable), or None."""
    path = Path(tag_dir) / rec["path"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size != rec["bytes"]:
        return f"size {size} ≠ {rec['bytes']} bytes recorded"
    if CHECKSUM in rec:
        try:
            crc = crc32_file(path)
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        if crc != rec[CHECKSUM]:
            return f"checksum mismatch ({CHECKSUM} {crc} ≠ {rec[CHECKSUM]} recorded)"
    return None


def check_files(tag_dir: str | Path, records: list[dict]) -> list[tuple[str, str]]:
    """[(relative path, problem)] for the records that do not match the files on disk."""
    problems = []
    for rec in records:
        try:
            why = check_file(tag_dir, rec)
        except Exception as e:       # a malformed record: never let verification itself crash
            why = f"cannot check: {type(e).__name__}: {e}"
        if why:
            problems.append((str(rec.get("path", "?")), why))
    return problems


def read_marker(tag_dir: str | Path) -> dict | None:
    """The tag's COMPLETE marker; None when it has none. Raises ValueError when it is unreadable."""
    path = Path(tag_dir) / MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"{MARKER} unreadable: {e.strerror or e}") from e
    try:
        marker = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{MARKER} is not valid JSON: {e}") from e
    if not isinstance(marker, dict) or not isinstance(marker.get("files", []), list):
        raise ValueError(f"{MARKER} is not a checkpoint marker")
    return marker


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def checkpoints_dir(run: str | Path) -> Path:
    """A run folder (train.out) → its checkpoints folder (a checkpoints folder is taken as is)."""
    run = Path(run)
    return run if run.name == "checkpoints" and not (run / "checkpoints").is_dir() else run / "checkpoints"


def tag_report(tag_dir: str | Path) -> dict:
    """One row of `vip checkpoints verify`: tag, step, files, bytes, state, complete."""
    tag_dir = Path(tag_dir)
    row = {"tag": tag_dir.name, "step": None, "files": 0, "bytes": 0, "complete": False}
    try:
        marker = read_marker(tag_dir)
    except ValueError as e:
        return {**row, "complete": True, "state": f"bad: {MARKER}: {e}"}
    if marker is None:
        on_disk = [p for p in tag_dir.rglob("*") if p.is_file()]
        return {**row, "files": len(on_disk), "bytes": sum(p.stat().st_size for p in on_disk),
                "state": f"incomplete (no {MARKER})"}
    row.update(complete=True, step=marker.get("step"))
    if "files" not in marker:
        on_disk = [p for p in tag_dir.rglob("*") if p.is_file() and p.name != MARKER]
        return {**row, "files": len(on_disk), "bytes": sum(p.stat().st_size for p in on_disk),
                "state": "unverified (old marker)"}
    files = marker["files"]
    row.update(files=len(files), bytes=sum(int(r.get("bytes", 0)) for r in files))
    problems = check_files(tag_dir, files)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return {**row, "state": f"bad: {problems[0][0]}: {problems[0][1]}{more}"}
    return {**row, "state": "ok"}


def verify_run(run: str | Path) -> tuple[list[dict], int]:
    """Every tag folder of a run, oldest first, and the exit status: 0 when the newest complete
    checkpoint verifies (or has an old marker without a file list), 1 otherwise (also: none)."""
    d = checkpoints_dir(run)
    tags = sorted(p for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    rows = [tag_report(p) for p in tags]
    complete = [r for r in rows if r["complete"]]
    ok = bool(complete) and (complete[-1]["state"] == "ok" or complete[-1]["state"].startswith("unverified"))
    return rows, 0 if ok else 1


def format_table(rows: list[dict]) -> str:
    head = ("tag", "step", "files", "bytes", "state")
    body = [(r["tag"], "" if r["step"] is None else str(r["step"]), str(r["files"]), human_bytes(r["bytes"]),
             r["state"]) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, body)])
