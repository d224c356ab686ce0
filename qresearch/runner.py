"""One run, as data flows: plan -> load -> (calibrate) -> method steps -> swap -> evaluate -> measure -> write/log."""
from __future__ import annotations

import logging
import random
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import Plan, plan
from .data.tokens import calibration_ids, eval_streams
from .eval.footprint import footprint, peak_memory, reset_peak_memory
from .eval.ppl import perplexity, sliding_perplexity
from .method import Context, QuantResult
from .models.arch import arch_for
from .models.load import load_model, resolve_dtype
from .nn.swap import swap_linears
from .quant.spec import ConfigError
from .tracking.provenance import provenance
from .tracking.store import append_index, atomic_write_json, config_hash, read_index, read_metrics, save_artifacts, \
    write_csv
from .tracking.summary import index_row, print_summary
from .tracking.wandb_logger import WandbLogger

log = logging.getLogger("qresearch")


def _output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.out_dir)


def _discard(out_dir: Path) -> None:
    """Remove a run dir that holds nothing but Hydra's own files (a run refused before it started)."""
    if out_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in out_dir.iterdir()):
        shutil.rmtree(out_dir, ignore_errors=True)
        for parent in (out_dir.parent, out_dir.parent.parent):  # <model>/<tag>/ if now empty
            try:
                parent.rmdir()
            except OSError:
                break


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> dict:
    """Run one configured experiment; returns its metrics. Bad input raises ConfigError before any loading."""
    out_dir = _output_dir(cfg)
    try:
        p = plan(cfg)
    except ConfigError:
        _discard(out_dir)
        raise
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash({k: v for k, v in cfg_dict.items() if k not in HASH_EXCLUDE})
    done = _completed(Path(cfg_dict["paths"]["results"]), chash) if cfg.get("skip_done", False) else None
    if done is not None:
        _discard(out_dir)
        print(f"== skipped (skip_done=true): {cfg.model.name} / {cfg.method.tag} already complete in {done}", flush=True)
        return read_metrics(done)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _logger(cfg, out_dir)
    try:
        metrics = execute(p, cfg_dict, chash, out_dir, logger)
    except BaseException as e:
        atomic_write_json(out_dir / "failure.json", {"error": f"{type(e).__name__}: {e}", "config_hash": chash,
                                                     "traceback": traceback.format_exc(), "time": _now()})
        logger.finish(exit_code=1)
        raise
    logger.finish()
    return metrics


# where/how a run is written, not what it computes; bits/group_size/sym act only through the method steps they
# interpolate into (so fp16 at bits=3 and bits=4 is one config)
HASH_EXCLUDE = ("out_dir", "paths", "logger", "skip_done", "bits", "group_size", "sym")


def _completed(results_root: Path, chash: str) -> Path | None:
    """Run dir of an earlier complete run (a readable metrics.json) with the same config hash, if any."""
    for row in reversed(read_index(results_root / "runs" / "index.jsonl")):
        d = Path(row["run_dir"])
        if row.get("config_hash") == chash and read_metrics(d) is not None:
            return d
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _logger(cfg: DictConfig, out_dir: Path) -> WandbLogger | _NullLogger:
    lg = cfg.logger
    if lg.name != "wandb":
        return _NullLogger()
    return WandbLogger(project=lg.project, mode=lg.mode, entity=lg.entity, group=lg.group, tags=list(lg.tags),
                       name=f"{cfg.model.name}/{cfg.method.tag}", dir=lg.dir, init_timeout=lg.init_timeout)


class _NullLogger:
    status = "off"

    def start(self, config): ...
    def summary(self, metrics): ...
    def table(self, key, rows): ...
    def log(self, data): ...
    def finish(self, exit_code=0): ...


def _ppl_all(model, p: Plan, streams: dict, device, label: str) -> dict:
    e = p.eval
    if e.protocol == "sliding":
        return {ds: sliding_perplexity(model, ids, e.seqlen, e.stride, device, e.max_chunks, desc=f"{label} {ds}")
                for ds, (ids, _src) in streams.items()}
    return {ds: perplexity(model, ids, e.seqlen, device, e.max_chunks, e.batch_size, desc=f"{label} {ds}")
            for ds, (ids, _src) in streams.items()}


def _baseline(model, p: Plan, streams: dict, device, tok) -> dict:
    """FP perplexities, cached and validated per dataset (eval/baseline_cache.py) so a sweep pays once."""
    from .eval.baseline_cache import cached_baseline

    protocol = {"dtype": str(resolve_dtype(p.model, device)), "device": device.type, "protocol": p.eval.protocol,
                "seqlen": p.eval.seqlen, "stride": p.eval.stride, "max_chunks": p.eval.max_chunks,
                "batch_size": p.eval.batch_size}
    return cached_baseline(model, tok, streams, protocol, lambda sub: _ppl_all(model, p, sub, device, "fp"))


def _quantize(p: Plan, model, arch, tok, device) -> tuple[QuantResult, dict | None, float]:
    """Calibration data (if any step needs it), then each method step in order; returns result, calib provenance,
    seconds."""
    calib, calib_prov = None, None
    if p.needs_calibration:
        c = p.calib
        calib, calib_prov = calibration_ids(c["name"], tok, c["n_samples"], c["seqlen"], p.seed, c["root"], c["source"])
    t1 = time.perf_counter()
    result = QuantResult()
    for step in p.steps:
        ctx = Context(calib=calib, arch=arch, device=device, seed=p.seed, prior=result)
        result = result.merge(step.quantize(model, ctx))
    return result, calib_prov, time.perf_counter() - t1


def _evaluate(p: Plan, model, tok, streams: dict, fp: dict, device) -> tuple[dict, dict | None, float]:
    """Perplexities (with their protocol, source and FP delta) and lm-eval tasks on the model as it is now."""
    t2 = time.perf_counter()
    ppl = _ppl_all(model, p, streams, device, p.method_name) if streams else {}
    lm_eval = None
    if p.eval.lm_eval:
        from .eval.lm_eval_bridge import run_lm_eval

        le = p.eval.lm_eval
        lm_eval = run_lm_eval(model, tok, le["tasks"], p.eval.root, le["limit"], le["num_fewshot"], le["batch_size"],
                              p.seed, le.get("include_path"), le.get("add_bos_token", "auto"))
    for ds, r in ppl.items():
        _, src = streams[ds]
        r.update(dataset=ds, split=src.split, origin=src.origin, text_sha256=src.sha256)
        if ds in fp:
            r.update(fp_ppl=fp[ds]["ppl"], delta_ppl=r["ppl"] - fp[ds]["ppl"])
    return ppl, lm_eval, time.perf_counter() - t2


def _extras(p: Plan, cfg_dict: dict, model, tok, kernels: dict, device, out_dir: Path) -> dict:
    """Optional measurements: packed bytes as measured, latency, export."""
    out = {}
    if p.format == "packed":  # bytes the packed buffers really take, next to the bits/weight arithmetic
        from .nn.packed import packed_weight_bytes

        out["measured_packed_bytes"] = packed_weight_bytes(model)
        out["kernels_by_layer"] = kernels
    latency = cfg_dict["eval"].get("latency") or {}
    if latency.get("enabled"):
        from .eval.latency import LatencyConfig, measure_latency

        out["latency"] = measure_latency(model, device, LatencyConfig(**latency), p.seed)
    if p.export:
        out["export"] = _export(model, tok, p.export, out_dir / "export")
    return out


def execute(p: Plan, cfg_dict: dict, chash: str, out_dir: Path, logger) -> dict:
    _seed(p.seed)
    device = p.device
    reset_peak_memory(device)
    logger.start(cfg_dict)
    t0 = time.perf_counter()
    model, tok = load_model(p.model, device, p.seed)
    t_load = time.perf_counter() - t0
    arch = arch_for(model)
    streams = eval_streams(p.eval.datasets, tok, p.eval.seqlen)
    fp = _baseline(model, p, streams, device, tok) if p.eval.baseline and p.steps else {}
    result, calib_prov, t_quant = _quantize(p, model, arch, tok, device)
    kernels = swap_linears(model, result, p.format)
    ppl, lm_eval, t_eval = _evaluate(p, model, tok, streams, fp, device)
    metrics = {
        "run": {"model": p.model.name, "method": p.method_name, "tag": p.method_tag, "bits": p.bits,
                "group_size": p.group_size, "sym": p.sym, "format": p.format, "config_hash": chash,
                "steps": [{"name": s.name, **s.describe()} for s in p.steps], "time": _now()},
        "model": {"dtype": str(resolve_dtype(p.model, device)), "weights_note": p.model.weights_note,
                  "params": sum(x.numel() for x in model.parameters()), "source": p.model.source},
        "ppl": ppl,
        "footprint": footprint(model, result),
        "memory": peak_memory(device),
        "timing": {"load_seconds": t_load, "quantize_seconds": t_quant, "eval_seconds": t_eval},
        "kernels": {k: sum(1 for v in kernels.values() if v == k) for k in sorted(set(kernels.values()))},
        "calibration": calib_prov,
        "wandb": logger.status,
    }
    if lm_eval is not None:
        metrics["lm_eval"] = lm_eval
    extras = _extras(p, cfg_dict, model, tok, kernels, device, out_dir)
    if "measured_packed_bytes" in extras:
        metrics["footprint"]["measured_packed_bytes"] = extras.pop("measured_packed_bytes")
    metrics.update(extras)
    _write(out_dir, cfg_dict, metrics, result, provenance(device, p.seed) | {"calibration": calib_prov}, logger)
    return metrics


def _export(model, tok, kind: str, path: Path) -> dict:
    """Write the packed model (qresearch-packed or compressed-tensors pack-quantized) next to the run's metrics."""
    if kind == "qresearch":
        from .export.packed import save_quantized

        save_quantized(model, path, tok)
    else:
        from .export.compressed import save_compressed_tensors

        save_compressed_tensors(model, path, tok)
    size = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    return {"format": kind, "path": str(path), "safetensors_bytes": size}


def _write(out_dir: Path, cfg_dict: dict, metrics: dict, result: QuantResult, prov: dict, logger) -> None:
    """Per-layer table, provenance, config, then metrics.json last (its presence marks a complete run)."""
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_dict))
    if result.stats:
        write_csv(out_dir / "layers.csv", result.stats)
    if result.artifacts:
        save_artifacts(out_dir / "artifacts.safetensors", result.artifacts)
    atomic_write_json(out_dir / "provenance.json", prov)
    logger.summary(metrics)
    logger.table("layers", result.stats)
    atomic_write_json(out_dir / "metrics.json", metrics)
    results_root = Path(cfg_dict["paths"]["results"])
    append_index(results_root / "runs" / "index.jsonl", index_row(metrics, out_dir))
    print_summary(metrics, out_dir)
