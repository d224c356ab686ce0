"""Triton's compile cache carried between GPU sessions, so device minutes go to measuring, not compiling.

A lent GPU machine starts bare: every kernel config the suite touches is compiled there (minutes of a 15-minute
lease). With `--triton-cache DIR` the suite restores DIR/cache.tar.gz (from an earlier run) into DIR/kernels, points
TRITON_CACHE_DIR there before Triton is imported, keeps only binaries in it (TRITON_STORE_BINARY_ONLY: cubin and
metadata, no IR), and at the end writes the cache back as <out>/triton_cache.tar.gz for the next session to carry.
Triton keys each entry by the kernel's source, its specialization, the options, the Triton version and ptxas
version and the GPU arch, so an entry is only ever reused for exactly the kernel it was compiled from; a changed
kernel simply compiles again. Neither variable is one of Triton's cache-invalidating ones.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

ARCHIVE = "cache.tar.gz"
OUT_NAME = "triton_cache.tar.gz"
MAX_BYTES = 15 * 2**20  # the device tool returns files of at most 16 MiB


def entries(cache_dir: Path) -> int:
    """Compiled kernels in a Triton cache folder (one metadata group file each)."""
    return sum(1 for _ in cache_dir.glob("*/__grp__*.json")) if cache_dir.is_dir() else 0


def restore(folder: Path) -> dict:
    """Unpack folder/cache.tar.gz (if any) into folder/kernels and make it Triton's cache; call before importing
    triton. Returns what was carried in."""
    cache = folder / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    archive = folder / ARCHIVE
    if archive.is_file():
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(cache, filter="data")  # plain files only, nothing outside `cache`
    os.environ["TRITON_CACHE_DIR"] = str(cache.resolve())
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    return {"dir": str(folder), "archive": archive.is_file(), "carried_entries": entries(cache)}


def pack(cache_dir: Path) -> bytes:
    """The cache folder as a gzipped tar (entries relative to it, sorted: the same cache gives the same bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(p for p in cache_dir.rglob("*") if p.is_file() and ".tmp." not in p.name):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(cache_dir)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    return buf.getvalue()


def save(info: dict, out: Path, max_bytes: int = MAX_BYTES) -> dict:
    """Write the cache to out/triton_cache.tar.gz when it fits the device tool's file limit; returns `info` with
    the entry counts and what was written (or why not)."""
    cache = Path(os.environ["TRITON_CACHE_DIR"])
    n = entries(cache)
    data = pack(cache)
    info = {**info, "entries": n, "compiled_this_run": n - info["carried_entries"], "archive_bytes": len(data)}
    if len(data) > max_bytes:
        return {**info, "written": None, "why_not": f"{len(data) / 2**20:.1f} MiB > {max_bytes / 2**20:.0f} MiB"}
    (out / OUT_NAME).write_bytes(data)
    return {**info, "written": str(out / OUT_NAME)}
