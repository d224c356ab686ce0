"""Which texts a run evaluates: the built-in benchmark splits and a researcher's own text files or HF datasets.

`eval.datasets` entries (parse_eval_sets):
  wikitext2 | ptb | c4                      built-in split (eval.splits), the published text only
  /data/valid.txt                           own text file, labelled by its stem ('valid')
  tinystories:/data/valid.txt               own text file, labelled 'tinystories'
  {name: tinystories, path: /data/valid.txt[, field: text]}
  {name: ts, hf: roneneldan/TinyStories, split: validation[, config: null, field: text]}   (a Hub id or a local
                                            dataset folder, read with datasets.load_dataset)
Own text goes through the same protocol and caches as the built-ins: .txt/.raw files are used as they are;
.jsonl / .parquet rows and HF dataset rows (their `field`) are joined with "\\n\\n". Each is recorded with its
origin and the sha256 of the text used.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..quant.spec import ConfigError
from .text import EVAL_SETS, Source, check_available, check_parquet, eval_text, hub_reachable

TEXT_SUFFIXES = (".txt", ".raw", ".text", ".md")
ROW_SUFFIXES = (".jsonl", ".parquet")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
FORMS = ("wikitext2|ptb|c4, a text file path, name:path, {name: .., path: ..}, "
         "{name: .., hf: <dataset id or folder>, split: ..}")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation text: a built-in split, an own file, or an HF dataset split."""

    name: str  # label in metrics (ppl.<name>) and reports
    split: str  # built-in split, 'file' for own files, the HF split
    kind: str  # builtin | file | hf
    root: str = ""  # builtin: data.root
    source: str = "auto"  # builtin: data.source
    path: str = ""  # file: the file; hf: dataset id or local dataset folder
    config: str | None = None  # hf: dataset config name
    field: str = "text"  # jsonl / parquet / hf: the text field


def parse_eval_sets(entries, splits, root: str, source: str) -> list[EvalSet]:
    """eval.datasets -> checked EvalSets (files read and checked here, before any model loads)."""
    sets = [_parse_one(e, splits, root, source) for e in entries]
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.datasets names {dup} more than once; give each text its own name")
    for s in sets:
        check_eval_set(s)
    return sets


def _parse_one(entry, splits, root: str, source: str) -> EvalSet:
    if hasattr(entry, "items"):  # a dict (DictConfig) entry
        return _from_dict(dict(entry.items()))
    e = str(entry)
    if e in EVAL_SETS:
        split = splits.get(e) if splits is not None else None
        if split is None:
            raise ConfigError(f"eval.splits has no split for {e}; set eval.splits.{e}=<split>")
        return EvalSet(e, str(split), "builtin", root=root, source=source)
    name, sep, path = e.partition(":")
    if sep and name == "hf":
        raise ConfigError(f"eval dataset={e!r}: an HF dataset needs its split; use {{name: .., hf: {path}, "
                          f"split: ..}}")
    if sep and NAME_RE.match(name) and ("/" in path or Path(path).suffix):
        return _from_dict({"name": name, "path": path})
    if "/" in e or Path(e).suffix in TEXT_SUFFIXES + ROW_SUFFIXES:
        return _from_dict({"name": re.sub(r"[^A-Za-z0-9_.-]", "_", Path(e).stem) or "text", "path": e})
    raise ConfigError(f"eval dataset={e!r} is unknown; allowed: {FORMS}")


def _from_dict(d: dict) -> EvalSet:
    allowed = {"name", "path", "hf", "split", "config", "field"}
    extra = sorted(set(d) - allowed)
    if extra:
        raise ConfigError(f"eval dataset entry {d} has unknown key(s) {extra}; allowed: {', '.join(sorted(allowed))}")
    name = str(d.get("name") or "")
    if not NAME_RE.match(name):
        raise ConfigError(f"eval dataset name={name!r} is invalid; allowed: a letter, then letters, digits, _ . - "
                          f"(at most 64)")
    if name in EVAL_SETS:
        raise ConfigError(f"eval dataset name={name!r} is a built-in benchmark; give your own text another name")
    if bool(d.get("path")) == bool(d.get("hf")):
        raise ConfigError(f"eval dataset {name!r}: give exactly one of path (a text/jsonl/parquet file) or hf "
                          f"(a datasets id or folder)")
    field = str(d.get("field") or "text")
    if d.get("path"):
        if d.get("split") or d.get("config"):
            raise ConfigError(f"eval dataset {name!r}: split/config apply to hf datasets, not to a file")
        return EvalSet(name, "file", "file", path=str(Path(str(d["path"])).expanduser()), field=field)
    if not d.get("split"):
        raise ConfigError(f"eval dataset {name!r} (hf={d['hf']}): split is required, e.g. split: validation")
    return EvalSet(name, str(d["split"]), "hf", path=str(d["hf"]), config=d.get("config"), field=field)


def check_eval_set(s: EvalSet) -> None:
    """Cheap enough to run before model loading: the file exists, is whole and holds text."""
    if s.kind == "builtin":
        check_available(s.name, s.split, s.root, s.source)
    elif s.kind == "file":
        read_file_text(s)
    elif not Path(s.path).exists() and not hub_reachable():
        raise ConfigError(f"eval dataset {s.name!r}: hf={s.path} is not a local folder and the HF Hub is "
                          f"unreachable (offline)")


def read_file_text(s: EvalSet) -> str:
    """The text of an own file: a text file as it is, jsonl / parquet rows joined with blank lines."""
    p = Path(s.path)
    if not p.is_file():
        what = "is a folder; allowed: a text, .jsonl or .parquet file" if p.is_dir() else "does not exist"
        raise ConfigError(f"eval dataset {s.name!r}: file {p} {what}")
    if p.stat().st_size == 0:
        raise ConfigError(f"eval dataset {s.name!r}: file {p} is empty")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        check_parquet(p, s.field)
        docs = pq.read_table(p, columns=[s.field]).column(s.field).to_pylist()
        return _joined(s, [d for d in docs if d])
    try:
        raw = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"eval dataset {s.name!r}: file {p} is not UTF-8 text (bad byte at offset {e.start}; "
                          f"binary or cut mid-character)") from None
    if p.suffix == ".jsonl":
        return _joined(s, _jsonl_docs(s, p, raw))
    if not raw.strip():
        raise ConfigError(f"eval dataset {s.name!r}: file {p} holds only whitespace")
    return raw


def _jsonl_docs(s: EvalSet, p: Path, raw: str) -> list[str]:
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"eval dataset {s.name!r}: {p} line {i} is not JSON (truncated?)") from None
        if not isinstance(row, dict) or not isinstance(row.get(s.field), str):
            raise ConfigError(f"eval dataset {s.name!r}: {p} line {i} has no string field {s.field!r} "
                              f"(set field: <name>)")
        docs.append(row[s.field])
    return docs


def _joined(s: EvalSet, docs: list[str]) -> str:
    text = "\n\n".join(docs)
    if not text.strip():
        raise ConfigError(f"eval dataset {s.name!r}: {s.path} holds no text in field {s.field!r}")
    return text


def _hf_text(s: EvalSet) -> str:
    from datasets import load_dataset

    try:
        ds = load_dataset(s.path, s.config, split=s.split)
    except Exception as e:  # datasets raises many types (missing split, files, network)
        raise ConfigError(f"eval dataset {s.name!r}: datasets.load_dataset({s.path!r}, {s.config!r}, "
                          f"split={s.split!r}) failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    if s.field not in ds.column_names:
        raise ConfigError(f"eval dataset {s.name!r}: {s.path} has no column {s.field!r} "
                          f"(columns: {', '.join(ds.column_names)})")
    return _joined(s, [d for d in ds[s.field] if d])


def set_text(s: EvalSet) -> tuple[str, Source]:
    """The eval string of a set and where it came from (origin, sha256 of the text)."""
    if s.kind == "builtin":
        return eval_text(s.name, s.split, s.root, s.source)
    if s.kind == "file":
        text, origin = read_file_text(s), f"local:{Path(s.path).resolve()}"
    else:
        text, origin = _hf_text(s), f"{'local' if Path(s.path).exists() else 'hub'}:{s.path}" + \
            (f"/{s.config}" if s.config else "")
    return text, Source(s.name, s.split, origin, hashlib.sha256(text.encode()).hexdigest())
