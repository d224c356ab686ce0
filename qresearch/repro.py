"""Reproduction checks: published numbers (experiment presets with a `paper:` block) vs our finished runs.

    python -m qresearch.repro                       # conf/experiment/*.yaml vs results/runs/index.jsonl
    python -m qresearch.repro --presets DIR --results DIR --out results/repro.md

A preset is a Hydra experiment config (`# @package _global_`, run as `python run.py +experiment=<name>`) with

    paper:
      source: "GPTQ (Frantar et al. 2022), Table 3"   # where the number is published
      metric: ppl                  # ppl (perplexity on an eval dataset) | acc (lm-eval task accuracy)
      dataset: wikitext2           # eval dataset (ppl) or lm-eval task (acc)
      value: 31.12                 # the published number
      tolerance: 0.6               # |ours - value| <= tolerance -> PASS (absolute, in the metric's unit)
      protocol:                    # what a run must match to be compared (else REFUSED, with the reasons)
        split: test                # eval split (ppl)
        seqlen: 2048               # eval sequence length (ppl)
        eval: gptq_chunks          # perplexity protocol: gptq_chunks | sliding_window (ppl)
        num_fewshot: 0             # (acc)
        bits: 4                    # effective weight bits (16 = none)
        group_size: -1             # -1 per output channel, null for bits 16
        sym: false                 # optional
        act_bits: 16               # optional, default 16
        calibration: {dataset: c4, n_samples: 128, seqlen: 2048}   # null = no calibration
        deviations: []             # accepted differences from the paper's setup, printed with the row

A run belongs to a preset when its config's `paper` block equals the preset's in everything but value and
tolerance (so a corrected published value keeps its runs). It is compared only when its model and method are the
preset's, it evaluated the whole split (no eval.max_chunks / lm-eval limit) and every protocol entry matches.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ROOT
from .errors import ConfigError
from .tracking.runs import FinishedRun, finished_runs

PAPER_KEYS = ("source", "metric", "dataset", "value", "tolerance", "protocol")
PROTOCOL_KEYS = ("split", "seqlen", "eval", "num_fewshot", "bits", "group_size", "sym", "act_bits", "calibration",
                 "deviations")
CALIB_KEYS = ("dataset", "n_samples", "seqlen")
METRICS = ("ppl", "acc")  # what this harness evaluates (language models)
OTHER_METRICS = ("top1_accuracy", "top1_gap_to_fp")  # image-classification papers: listed, never evaluated here
OPTIONAL_KEYS = ("fp_value",)  # the paper's unquantized number, shown next to its quantized one


@dataclass
class PaperRef:
    source: str
    metric: str
    dataset: str
    value: float
    tolerance: float
    protocol: dict[str, Any]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PaperRef":
        """Validated `paper:` block; a bad one is a one-line ConfigError naming the preset and the key."""
        if not isinstance(d, dict) or not set(PAPER_KEYS) <= set(d) <= set(PAPER_KEYS + OPTIONAL_KEYS):
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ConfigError(f"{where}: paper block must have the keys {', '.join(PAPER_KEYS)} (optional: "
                              f"{', '.join(OPTIONAL_KEYS)}); got {got}")
        if d["metric"] not in METRICS + OTHER_METRICS:
            raise ConfigError(f"{where}: paper.metric={d['metric']!r} is unknown; allowed: "
                              f"{', '.join(METRICS + OTHER_METRICS)}")
        for k in ("value", "tolerance"):
            if not isinstance(d[k], (int, float)) or isinstance(d[k], bool) or (k == "tolerance" and d[k] < 0):
                raise ConfigError(f"{where}: paper.{k}={d[k]!r} is not a {'non-negative ' * (k == 'tolerance')}number")
        proto = d["protocol"]
        bad = sorted(set(proto) - set(PROTOCOL_KEYS)) if isinstance(proto, dict) else ["<not a mapping>"]
        if bad:
            raise ConfigError(f"{where}: paper.protocol keys {bad} unknown; allowed: {', '.join(PROTOCOL_KEYS)}")
        calib = proto.get("calibration")
        if calib is not None and (not isinstance(calib, dict) or set(calib) != set(CALIB_KEYS)):
            raise ConfigError(f"{where}: paper.protocol.calibration must be null or have keys {', '.join(CALIB_KEYS)}")
        return cls(**{k: d[k] for k in PAPER_KEYS})

    def identity(self) -> dict:
        """What a run must carry to belong to this reference (all but value and tolerance)."""
        return {"source": self.source, "metric": self.metric, "dataset": self.dataset, "protocol": self.protocol}


@dataclass
class Preset:
    name: str
    model: str  # model.name the preset composes to
    method: str  # method.name (the recipe)
    paper: PaperRef


@dataclass
class Row:
    preset: Preset
    status: str  # PASS | FAIL | REFUSED | NOT RUN
    ours: float | None = None
    run: str | None = None  # run dir relative to the results root
    notes: list[str] = field(default_factory=list)
    n_runs: int = 0  # runs that belong to the preset


def load_presets(folder: Path) -> list[Preset]:
    """Compose every <folder>/*.yaml as `+experiment=<name>` (folder is added to Hydra's search path)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise ConfigError(f"--presets {folder} is not a folder of experiment configs")
    group = folder.name
    presets = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for f in sorted(folder.glob("*.yaml")):
            cfg = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{folder.parent}]",
                                                            f"+{group}={f.stem}"])
            if "paper" not in cfg:
                raise ConfigError(f"{f}: no paper: block (every preset names the published number it checks)")
            paper = PaperRef.from_dict(OmegaConf.to_container(cfg.paper, resolve=True), str(f))
            presets.append(Preset(f.stem, str(cfg.model.name), str(cfg.method.name), paper))
    return presets


def _expect(diffs: list[str], what: str, ours: Any, paper: Any) -> None:
    if ours != paper:
        diffs.append(f"{what} {ours!r} != {paper!r}")


def _value_and_diffs(r: FinishedRun, p: Preset) -> tuple[float | None, list[str]]:
    """The run's number for the reference and the ways its protocol differs from the paper's (empty: comparable)."""
    m, ref, proto = r.metrics, p.paper, p.paper.protocol
    ev = (r.config or {}).get("eval", {})
    diffs: list[str] = []
    _expect(diffs, "model", m.run.model, p.model)
    _expect(diffs, "method", m.run.method, p.method)
    value = None
    if ref.metric == "ppl":
        res = m.ppl.get(ref.dataset)
        if res is None:
            return None, diffs + [f"{ref.dataset} perplexity not evaluated"]
        value = res.ppl
        for key, ours in (("split", res.split), ("seqlen", res.seqlen), ("eval", res.protocol)):
            if key in proto:
                _expect(diffs, key, ours, proto[key])
        if ev.get("max_chunks") is not None:
            diffs.append(f"evaluated only the first {ev['max_chunks']} chunks (eval.max_chunks), not the whole split")
    else:
        task = ((m.lm_eval or {}).get("tasks") or {}).get(ref.dataset)
        if task is None:
            return None, diffs + [f"lm-eval task {ref.dataset} not evaluated"]
        value, le = task["acc"], m.lm_eval["protocol"]
        if le.get("limit") is not None:
            diffs.append(f"lm-eval limit={le['limit']} items, not the whole task")
        if "num_fewshot" in proto:
            _expect(diffs, "num_fewshot", le.get("num_fewshot"), proto["num_fewshot"])
    for key in ("bits", "group_size", "sym"):
        if key in proto:
            _expect(diffs, key, getattr(m.run, key), proto[key])
    _expect(diffs, "act_bits", m.run.act_bits, proto.get("act_bits", 16))
    calib = None if m.calibration is None else {k: m.calibration.get(k) for k in CALIB_KEYS}
    _expect(diffs, "calibration", calib, proto.get("calibration"))
    return value, diffs


def check(p: Preset, runs: list[FinishedRun], results: Path) -> Row:
    """Newest comparable run of the preset -> PASS / FAIL; runs that all differ -> REFUSED; none -> NOT RUN."""
    mine = [r for r in runs if isinstance((r.config or {}).get("paper"), dict)
            and {k: v for k, v in r.config["paper"].items() if k not in ("value", "tolerance", *OPTIONAL_KEYS)} == p.paper.identity()]
    notes = [f"deviation: {d}" for d in p.paper.protocol.get("deviations") or []]
    if p.paper.metric in OTHER_METRICS:
        return Row(p, "NOT RUN", notes=[f"{p.paper.metric} on {p.paper.dataset}: an image-classification result; "
                                        "this harness evaluates language models only"] + notes)
    if not mine:
        return Row(p, "NOT RUN", notes=notes)
    mine.sort(key=lambda r: r.metrics.run.time, reverse=True)
    refused = []
    for r in mine:
        value, diffs = _value_and_diffs(r, p)
        if not diffs:
            ok = abs(value - p.paper.value) <= p.paper.tolerance
            return Row(p, "PASS" if ok else "FAIL", value, _rel(r.run_dir, results), notes, len(mine))
        refused.append((r, diffs))
    r, diffs = refused[0]
    return Row(p, "REFUSED", None, _rel(r.run_dir, results), notes + [f"protocol differs: {'; '.join(diffs)}"],
               len(mine))


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return Path(path).name


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def table(rows: list[Row]) -> list[str]:
    head = ["preset", "source", "model", "metric", "paper", "tolerance", "ours", "ours - paper", "status", "run",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in rows:
        ref = w.preset.paper
        delta = None if w.ours is None else w.ours - ref.value
        cells = [w.preset.name, ref.source, w.preset.model, f"{ref.metric} {ref.dataset}", _num(ref.value),
                 f"±{ref.tolerance:g}", _num(w.ours), "-" if delta is None else f"{delta:+.3g}", w.status,
                 w.run or "-", "; ".join(w.notes) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> list[Row]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", type=Path, default=ROOT / "conf" / "experiment", help="folder of experiment presets")
    ap.add_argument("--results", type=Path, default=Path(os.environ.get("QRESEARCH_RESULTS", ROOT / "results")))
    ap.add_argument("--out", type=Path, help="markdown table (default: <results>/repro.md)")
    a = ap.parse_args(argv)
    if not a.presets.is_dir():
        ap.error(f"--presets {a.presets} is not a folder; allowed: a folder of experiment presets (*.yaml)")
    if not a.results.is_dir():
        ap.error(f"--results {a.results} is not a folder; allowed: a results root (its runs/index.jsonl may be absent)")
    presets = load_presets(a.presets)
    if not presets:
        ap.error(f"--presets {a.presets} holds no preset with a paper: block")
    runs = finished_runs(a.results)
    rows = [check(p, runs, a.results) for p in presets]
    counts = {s: sum(w.status == s for w in rows) for s in ("PASS", "FAIL", "REFUSED", "NOT RUN")}
    lines = table(rows)
    print("\n".join(lines))
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    out = a.out or a.results / "repro.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(_header(a, len(runs), counts) + lines) + "\n")
    print(f"written: {out}")
    return rows


def _header(a: argparse.Namespace, n_runs: int, counts: dict) -> list[str]:
    from .tracking.provenance import commit_label, provenance

    import torch

    prov = provenance(torch.device("cpu"), 0)
    return ["# Reproduction checks: published numbers vs our runs", "",
            "Generated by `python -m qresearch.repro` (presets: conf/experiment/, runs: the results index) at code "
            f"{commit_label(prov) or 'unknown'}; {n_runs} finished runs in the index; "
            + ", ".join(f"{n} {s}" for s, n in counts.items()) + ".",
            "PASS / FAIL: |ours - paper| within / beyond the tolerance, for the newest run of the preset whose "
            "protocol (dataset, split, seqlen, perplexity protocol, whole split, bits, group, activation bits, "
            "calibration, model, method) matches the paper's; REFUSED: the preset's runs all differ (reasons "
            "given); NOT RUN: no run of the preset in the index. Run one with `python run.py +experiment=<preset>`.",
            ""]


if __name__ == "__main__":
    main()
