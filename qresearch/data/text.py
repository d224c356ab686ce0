"""Evaluation and calibration text, from local files (../shared/data layout) or, online, from HF datasets.

Protocol (GPTQ): an eval split is joined into one string, tokenized once, then cut into chunks.
  wikitext2: rows of wiki.test.raw as HF builds them (blank lines -> ''), joined with "\\n\\n"
  ptb:       stripped lines, joined with "\\n\\n"
  c4:        validation documents [0, 1100) joined with ' ' ('c4_new' in the GPTQ code), first 256 x seqlen tokens
Calibration from C4 uses documents [1100, 2000) only, so C4 evaluation never sees calibration text.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

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
EVAL_SETS = tuple(LOCAL_FILES)
CALIB_SETS = ("c4", "wikitext2", "random")


@dataclass
class Source:
    """Where text came from: recorded in metrics so no number hides its data."""

    dataset: str
    split: str
    origin: str  # 'local:<path>' or 'hub:<id>'
    sha256: str  # of the raw text used


def local_path(dataset: str, split: str, root: str) -> Path:
    if dataset not in LOCAL_FILES:
        raise ConfigError(f"dataset={dataset!r} is unknown; allowed: {', '.join(EVAL_SETS)}")
    if split not in LOCAL_FILES[dataset]:
        raise ConfigError(f"{dataset} split={split!r} is not available; allowed: {', '.join(LOCAL_FILES[dataset])}")
    return Path(root) / LOCAL_FILES[dataset][split]


def check_available(dataset: str, split: str, root: str, source: str) -> None:
    """Fail early (before model loading) if the data cannot be had under data.source."""
    path = local_path(dataset, split, root)
    if source == "local" and not path.is_file():
        raise ConfigError(f"data file {path} is missing (dataset {dataset}, split {split}); "
                          f"set data.root to the folder holding {LOCAL_FILES[dataset][split]}")
    if source not in ("local", "hub", "auto"):
        raise ConfigError(f"data.source={source!r} is unknown; allowed: auto, local, hub")


def _wikitext_rows(lines: list[str]) -> list[str]:
    return [ln if ln.strip() else "" for ln in lines]


def read_documents(dataset: str, split: str, root: str, source: str = "auto") -> tuple[list[str], str]:
    """Rows/documents of a split as the HF builder yields them, and the origin string."""
    path = local_path(dataset, split, root)
    if source == "local" or (source == "auto" and path.is_file()):
        if not path.is_file():
            raise ConfigError(f"data file {path} is missing (dataset {dataset}, split {split})")
        if dataset == "c4":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=["text"]).column("text").to_pylist(), f"local:{path}"
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        rows = _wikitext_rows(lines) if dataset == "wikitext2" else [ln.strip() for ln in lines]
        return rows, f"local:{path}"
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
