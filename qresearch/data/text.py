"""Evaluation and calibration text, from local files (../shared/data layout) or, online, from HF datasets.

Protocol (GPTQ): an eval split is joined into one string, tokenized once, then cut into chunks.
  wikitext2: rows of wiki.test.raw as HF builds them (blank lines -> ''), joined with "\\n\\n"
  ptb:       stripped lines, joined with "\\n\\n"
  c4:        validation documents [0, 1100) joined with ' ' ('c4_new' in the GPTQ code), first 256 x seqlen tokens
Calibration from C4 uses documents [1100, 2000) only, so C4 evaluation never sees calibration text.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import ConfigError

log = logging.getLogger(__name__)

C4_EVAL_DOCS = (0, 1100)
C4_CALIB_DOCS = (1100, 2000)

# dataset -> split -> path relative to data.root
LOCAL_FILES = {
    "wikitext2": {"test": "wikitext2/wiki.test.raw"},
    "ptb": {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt"},
    "c4": {"validation": "c4/c4_validation_2k.parquet"},
}
HUB = {  # dataset -> (hub path, config, text field)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "c4": ("allenai/c4", None, "text"),
}
# the published files (bytes, sha256): a built-in name guarantees the standard text, so a truncated or edited copy
# is refused (evaluate a different text under its own name instead: eval.datasets=[{name: ..., path: ...}])
KNOWN_FILES = {
    "wikitext2/wiki.test.raw": (1290590, "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
    "ptb/ptb.test.txt": (449945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    "ptb/ptb.valid.txt": (399782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
}
EVAL_SETS = tuple(LOCAL_FILES)
CALIB_SETS = ("c4", "wikitext2", "random")


@dataclass
class Source:
    """Where text came from: recorded in metrics so no number hides its data."""

    dataset: str
    split: str
    origin: str  # 'local:<file relative to the data root>' or 'hub:<id>'
    sha256: str  # of the raw text used


def local_path(dataset: str, split: str, root: str) -> Path:
    if dataset not in LOCAL_FILES:
        raise ConfigError(f"dataset={dataset!r} is unknown; allowed: {', '.join(EVAL_SETS)}")
    if split not in LOCAL_FILES[dataset]:
        raise ConfigError(f"{dataset} split={split!r} is not available; allowed: {', '.join(LOCAL_FILES[dataset])}")
    return Path(root) / LOCAL_FILES[dataset][split]


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the Hub host does not answer a TCP connect (one try, no retries)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_available(dataset: str, split: str, root: str, source: str) -> None:
    """Fail early (before model loading) if the data cannot be had under data.source, or the local file is damaged."""
    if source not in ("local", "hub", "auto"):
        raise ConfigError(f"data.source={source!r} is unknown; allowed: auto, local, hub")
    path = local_path(dataset, split, root)
    if source != "hub" and path.is_file():
        check_local_file(dataset, path, LOCAL_FILES[dataset][split])
        return
    where = f"set data.root to the folder holding {LOCAL_FILES[dataset][split]}"
    if source == "local":
        raise ConfigError(f"data file {path} is missing (dataset {dataset}, split {split}); {where}")
    if not hub_reachable():
        missing = f"data file {path} is missing and " if source == "auto" else "data.source=hub but "
        raise ConfigError(f"{missing}the HF Hub is unreachable (offline) for {dataset}/{split}; {where}")


def check_calibration(dataset: str, root: str, source: str) -> None:
    """Fail before model loading if calibration text cannot be had (C4 file checked; wikitext2 train needs the Hub)."""
    if dataset not in CALIB_SETS:
        raise ConfigError(f"calibration dataset={dataset!r} is unknown; allowed: {', '.join(CALIB_SETS)}")
    if dataset == "c4":
        check_available("c4", "validation", root, source)
    elif dataset == "wikitext2" and (source == "local" or not hub_reachable()):
        raise ConfigError("calibration on wikitext2 needs its train split from the HF Hub, which is "
                          f"{'excluded by data.source=local' if source == 'local' else 'unreachable'}; "
                          "use data=c4 or data=random")


def check_local_file(dataset: str, path: Path, rel: str) -> None:
    """A built-in data file must be whole: non-empty, the published bytes (text), a readable parquet (C4)."""
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"data file {path} is empty (dataset {dataset}); restore {rel} under data.root")
    if dataset == "c4":
        check_parquet(path, "text", min_rows=C4_CALIB_DOCS[1])
        return
    want_size, want_sha = KNOWN_FILES[rel]
    if size != want_size or hashlib.sha256(path.read_bytes()).hexdigest() != want_sha:
        why = f"{size} bytes, the published file has {want_size}" if size != want_size else "edited content"
        raise ConfigError(f"data file {path} is not the published {dataset} text ({why}; truncated or another "
                          f"version); restore it, or evaluate it under its own name: eval.datasets=[mytext:{path}]")


def check_parquet(path: Path, column: str, min_rows: int = 1) -> int:
    """Rows of a parquet file after checking its footer, column and row count (one-line errors)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        raise ConfigError(f"data file {path} is not a readable parquet file ({str(e).splitlines()[0]}); "
                          f"it is truncated or not parquet") from None
    names = meta.schema.names
    if column not in names:
        raise ConfigError(f"data file {path} has no column {column!r} (columns: {', '.join(names)})")
    if meta.num_rows < min_rows:
        raise ConfigError(f"data file {path} has {meta.num_rows} rows; at least {min_rows} are needed")
    return meta.num_rows


def _wikitext_rows(lines: list[str]) -> list[str]:
    return [ln if ln.strip() else "" for ln in lines]


def read_documents(dataset: str, split: str, root: str, source: str = "auto") -> tuple[list[str], str]:
    """Rows/documents of a split as the HF builder yields them, and the origin string ('local:' + the file relative
    to the data root, so results name no machine's absolute paths; the text's sha256 pins the content)."""
    path = local_path(dataset, split, root)
    origin = f"local:{LOCAL_FILES[dataset][split]}"
    if source == "local" or (source == "auto" and path.is_file()):
        if not path.is_file():
            raise ConfigError(f"data file {path} is missing (dataset {dataset}, split {split})")
        if dataset == "c4":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path, columns=["text"]).column("text").to_pylist(), origin
            except Exception as e:  # a damaged data page behind an intact footer
                raise ConfigError(f"data file {path} could not be read ({str(e).splitlines()[0]})") from None
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        rows = _wikitext_rows(lines) if dataset == "wikitext2" else [ln.strip() for ln in lines]
        return rows, origin
    return _hub_documents(dataset, split), f"hub:{HUB[dataset][0]}"


def _hub_documents(dataset: str, split: str) -> list[str]:
    from datasets import load_dataset

    hub, cfg, field = HUB[dataset]
    if dataset == "c4":
        files = {split: f"en/c4-{split}.00000-of-{'00008' if split == 'validation' else '01024'}.json.gz"}
        ds = load_dataset(hub, data_files=files, split=split)
    else:
        ds = load_dataset(hub, cfg, split=split)
    return list(ds[field])


def eval_text(dataset: str, split: str, root: str, source: str = "auto") -> tuple[str, Source]:
    """The joined eval string of the GPTQ protocol and where it came from."""
    docs, origin = read_documents(dataset, split, root, source)
    if dataset == "c4":
        text = " ".join(docs[C4_EVAL_DOCS[0]:C4_EVAL_DOCS[1]])
    else:
        text = "\n\n".join(docs)
    return text, Source(dataset, split, origin, hashlib.sha256(text.encode()).hexdigest())
