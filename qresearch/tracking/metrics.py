"""The typed metrics record of one run: what metrics.json holds, and what the index, report, wandb logger and
experiments read (`Metrics.from_dict(json)`, `.row(run_dir)`), so no reader depends on loose string keys."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEMA = 2


def _build(cls, d: dict, where: str):
    """Dataclass from a dict: every required field present, no unknown keys (a damaged file fails here)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass
class RunInfo:
    model: str
    method: str  # the recipe (conf/method)
    tag: str  # built from the steps
    bits: int  # effective weight bits (16 = none quantized)
    group_size: int | None
    sym: bool | None
    qformat: str | None
    act_bits: int  # 16 = full-precision activations
    act_granularity: str | None
    act_qformat: str | None
    modules: str  # fake | packed
    config_hash: str
    seed: int
    time: str
    steps: list[dict[str, Any]] = field(default_factory=list)  # per step: what it used, its settings and cost
    commit: str | None = None  # git commit of the code that ran ('+dirty' when tracked files had changes)
    eval_signature: str | None = None  # what was evaluated (eval_signature()); dashboards filter on it
    calib_samples: int | None = None  # calibration windows the steps used (None: no step calibrated)


@dataclass
class ModelInfo:
    name: str
    source: str
    path: str
    dtype: str
    weights_note: str
    params: int  # all parameters of the model as loaded (before quantization)
    max_positions: int | None = None
    exported_by: dict | None = None  # a reloaded export: the run that wrote it (its config.json qresearch_source)


@dataclass
class PplResult:
    dataset: str
    split: str
    ppl: float
    nll: float
    seqlen: int
    n_tokens: int
    n_predicted: int
    protocol: str  # gptq_chunks | sliding_window
    origin: str  # local:<path relative to the data root> | hub:<id>
    text_sha256: str
    n_chunks: int | None = None
    n_windows: int | None = None
    stride: int | None = None
    fp_ppl: float | None = None
    delta_ppl: float | None = None


@dataclass
class Footprint:
    weight_bytes: float
    weight_bytes_fp16: float
    compression: float
    quantized_params: int
    other_params: int
    bits_per_weight: float  # effective: codes + qparams + extras over quantized weights
    measured_packed_bytes: int | None = None


@dataclass
class Timing:
    load_seconds: float
    quantize_seconds: float
    eval_seconds: float


@dataclass
class WandbRun:
    """Where the run went in wandb (None in Metrics when wandb was off or failed to start)."""

    project: str
    entity: str | None
    group: str | None
    id: str
    name: str
    mode: str  # online | offline


@dataclass
class Metrics:
    run: RunInfo
    model: ModelInfo
    ppl: dict[str, PplResult]
    footprint: Footprint
    memory: dict[str, int]
    timing: Timing
    kernels: dict[str, int]  # kernel name -> number of layers
    calibration: dict[str, Any] | None
    wandb: str
    lm_eval: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    kernels_by_layer: dict[str, str] | None = None
    wandb_run: WandbRun | None = None
    kv_cache: dict[str, Any] | None = None  # KV-cache quantization: settings, calls, cache bytes per context
    activations: dict[str, Any] | None = None  # outlier report summary (eval/outliers.py), runs with act quant
    schema: int = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "metrics") -> "Metrics":
        """Parse metrics.json; raises ValueError (naming `where`) when it is not a complete record."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ValueError(f"{where}: not a schema-{SCHEMA} metrics record")
        d = dict(d)
        d["run"] = _build(RunInfo, d.get("run"), f"{where}.run")
        d["model"] = _build(ModelInfo, d.get("model"), f"{where}.model")
        d["ppl"] = {k: _build(PplResult, v, f"{where}.ppl.{k}") for k, v in (d.get("ppl") or {}).items()}
        d["footprint"] = _build(Footprint, d.get("footprint"), f"{where}.footprint")
        d["timing"] = _build(Timing, d.get("timing"), f"{where}.timing")
        if d.get("wandb_run") is not None:
            d["wandb_run"] = _build(WandbRun, d["wandb_run"], f"{where}.wandb_run")
        return _build(cls, d, where)

    def row(self, run_dir: Path | str) -> dict:
        """One flat row for the results index and reports: identity, settings, headline numbers."""
        r, fp = self.run, self.footprint
        row = {"run_dir": str(run_dir), "model": r.model, "method": r.method, "tag": r.tag, "bits": r.bits,
               "group_size": r.group_size, "sym": r.sym, "qformat": r.qformat, "act_bits": r.act_bits,
               "modules": r.modules, "config_hash": r.config_hash, "seed": r.seed, "time": r.time, "commit": r.commit,
               "bits_per_weight": fp.bits_per_weight, "weight_bytes": fp.weight_bytes,
               "quantize_seconds": self.timing.quantize_seconds,
               "peak_rss_bytes": self.memory.get("peak_rss_bytes"), "peak_cuda_bytes": self.memory.get("peak_cuda_bytes"),
               "kernel_copies_bytes": self.memory.get("kernel_copies_bytes"),
               "weights_note": self.model.weights_note, "eval": self.eval_signature()}
        for ds, p in self.ppl.items():
            row[f"ppl_{ds}"] = p.ppl
            if p.fp_ppl is not None:
                row[f"fp_ppl_{ds}"] = p.fp_ppl
        if self.kv_cache:
            row["kv_bits"], row["kv_qformat"] = self.kv_cache["bits"], self.kv_cache["qformat"]
        for key, val in _flat(self.latency or {}, "latency_").items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                row[key] = val
        for task, t in (self.lm_eval or {}).get("tasks", {}).items():
            for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                if k in t:
                    row[f"{task}_{k}"] = t[k]
        return row

    def eval_signature(self) -> str:
        """What was evaluated, in one string: runs with different signatures never share a table."""
        return eval_signature(self.ppl, self.lm_eval)


def eval_signature(ppl: dict[str, PplResult], lm_eval: dict[str, Any] | None) -> str:
    """'<dataset>/<split> <protocol> L<seqlen> <n> tok; lm-eval <task> n=<k> <f>-shot' for the evaluations given
    (an own text's label carries its hash)."""
    le = lm_eval or {}
    parts = [f"{_text_label(ds, p)} {p.protocol} L{p.seqlen} {p.n_tokens} tok" for ds, p in sorted(ppl.items())]
    parts += [f"lm-eval {t} n={v['n_samples']} {le['protocol']['num_fewshot']}-shot"
              for t, v in sorted(le.get("tasks", {}).items())]
    return "; ".join(parts)


def _text_label(ds: str, p: PplResult) -> str:
    """'wikitext2/test'; an own text also carries its hash ('tinystories/file#1a2b3c4d'): one name, one text."""
    from ..data.text import EVAL_SETS

    return f"{ds}/{p.split}" + (f"#{p.text_sha256[:8]}" if ds not in EVAL_SETS else "")


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out
