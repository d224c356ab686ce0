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

from .config import Plan, check_positions, plan
from .data.tokens import calibration_ids, eval_streams
from .errors import ConfigError
from .eval.footprint import footprint, peak_memory, reset_peak_memory
from .eval.kvcache import enable_kv_cache, kv_cache_report
from .eval.outliers import start_watch
from .eval.ppl import perplexity, sliding_perplexity
from .kernels.prepared import derived_bytes
from .method import Context
from .models.arch import arch_for
from .models.load import load_model, positions_of, resolve_dtype
from .nn.swap import swap_linears
from .records import QuantResult
from .tracking.metrics import Footprint, Metrics, ModelInfo, PplResult, RunInfo, Timing, eval_signature
from .tracking.provenance import commit_label, provenance
from .tracking.store import (append_index, atomic_write_json, completed_run, config_hash, hashed, read_metrics,
                             write_csv)
from .tracking.summary import print_summary
from .tracking.wandb_logger import make_logger

log = logging.getLogger("qresearch")


def _output_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.out_dir)


def _cli_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra app, e.g. a composed config in a test)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: DictConfig) -> dict:
    """Run one configured experiment; returns its metrics. Bad input raises ConfigError before any loading."""
    out_dir = _output_dir(cfg)
    try:
        p = plan(cfg, _cli_overrides())
    except ConfigError:
        _discard(out_dir)
        raise
    cfg_dict = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(hashed(cfg_dict))
    results_root = Path(cfg_dict["paths"]["results"])
    done = completed_run(results_root / "runs" / "index.jsonl", chash) if cfg.skip_done else None
    if done is not None:
        _discard(out_dir)
        print(f"== skipped (skip_done=true): {p.model.name} / {p.tag} already complete in {done}", flush=True)
        return read_metrics(done)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = make_logger(cfg_dict["logger"], f"{p.model.name}/{p.tag}",
                         [f"w{p.facts['bits']}", f"a{p.facts['act_bits']}", p.modules])
    try:
        metrics = execute(p, cfg_dict, chash, out_dir, logger)
    except BaseException as e:
        atomic_write_json(out_dir / "failure.json", {"error": f"{type(e).__name__}: {e}", "config_hash": chash,
                                                     "traceback": traceback.format_exc(), "time": _now()})
        logger.finish(exit_code=1)
        raise
    logger.finish()
    return metrics.to_dict()


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


def _quantize(p: Plan, model, arch, tok, device, out_dir: Path | None = None, log=None
              ) -> tuple[QuantResult, list[dict], dict | None, float]:
    """Calibration data (if any step needs it), then each method step in order; returns the merged result,
    what each step used (its record + facts it reported), calibration provenance and seconds."""
    calib, calib_prov = None, None
    if p.needs_calibration:
        c = p.calib
        calib, calib_prov = calibration_ids(c["name"], tok, c["n_samples"], c["seqlen"], p.seed, c["root"], c["source"])
    t1 = time.perf_counter()
    result, records = QuantResult(), []
    for step in p.steps:
        t = time.perf_counter()
        step_result = step.quantize(model, Context(calib=calib, arch=arch, device=device, seed=p.seed, prior=result,
                                                   out_dir=out_dir, log=log))
        records.append({**step.record(), **step_result.info, "seconds": time.perf_counter() - t})
        result = result.merge(step_result)
    return result, records, calib_prov, time.perf_counter() - t1


def _evaluate(p: Plan, model, tok, streams: dict, fp: dict, device) -> tuple[dict, dict | None, float]:
    """Perplexities (with their protocol, source and FP delta) and lm-eval tasks on the model as it is now."""
    t2 = time.perf_counter()
    raw = _ppl_all(model, p, streams, device, p.recipe) if streams else {}
    lm_eval = None
    if p.eval.lm_eval:
        from .eval.lm_eval_bridge import run_lm_eval

        le = p.eval.lm_eval
        lm_eval = run_lm_eval(model, tok, le["tasks"], p.eval.root, le["limit"], le["num_fewshot"], le["batch_size"],
                              p.seed, le.get("include_path"), le.get("add_bos_token", "auto"))
    ppl = {}
    for ds, r in raw.items():
        _, src = streams[ds]
        fp_ppl = fp[ds]["ppl"] if ds in fp else None
        ppl[ds] = PplResult(dataset=ds, split=src.split, origin=src.origin, text_sha256=src.sha256, fp_ppl=fp_ppl,
                            delta_ppl=None if fp_ppl is None else r["ppl"] - fp_ppl, **r)
    return ppl, lm_eval, time.perf_counter() - t2


def _extras(p: Plan, model, tok, kernels: dict, device, out_dir: Path, source: dict) -> dict:
    """Optional measurements: latency, export (`source`: the run that made it, written into its config.json),
    per-layer kernels."""
    out = {}
    if p.modules == "packed":
        out["kernels_by_layer"] = kernels
    if p.eval.latency:
        from .eval.latency import LatencyConfig, measure_latency

        out["latency"] = measure_latency(model, device, LatencyConfig(**p.eval.latency), p.seed)
    if p.export:
        from .export import export_model

        out["export"] = export_model(p.export, model, tok, out_dir / "export", source)
    return out


def export_source(run: RunInfo) -> dict:
    """What an export records of the run that wrote it (config.json "qresearch_source"): model, recipe and tag,
    config hash (the run's metrics.json in the results index), code commit. No time or path: identical runs write
    identical exports."""
    return {"model": run.model, "method": run.method, "tag": run.tag, "config_hash": run.config_hash,
            "commit": run.commit}


def _footprint(p: Plan, model, result: QuantResult) -> Footprint:
    fp = Footprint(**footprint(model, result))
    if p.modules == "packed":  # bytes the packed buffers really take, next to the bits/weight arithmetic
        from .nn.packed import packed_weight_bytes

        fp.measured_packed_bytes = packed_weight_bytes(model)
    return fp


def execute(p: Plan, cfg_dict: dict, chash: str, out_dir: Path, logger) -> Metrics:
    _seed(p.seed)
    device = p.device
    reset_peak_memory(device)
    logger.start(cfg_dict)
    t0 = time.perf_counter()
    model, tok = load_model(p.model, device, p.seed)
    t_load = time.perf_counter() - t0
    limit = positions_of(model.config.to_dict())
    check_positions(p.model.name, limit, {"eval.seqlen": p.eval.seqlen} |
                    ({"data.seqlen": p.calib["seqlen"]} if p.needs_calibration else {}))
    model_info = ModelInfo(p.model.name, p.model.source, p.model.path, str(resolve_dtype(p.model, device)),
                           p.model.weights_note, sum(x.numel() for x in model.parameters()), limit,
                           getattr(model.config, "qresearch_source", None))
    arch = arch_for(model)
    streams = eval_streams(p.eval.datasets, tok, p.eval.seqlen)
    fp = _baseline(model, p, streams, device, tok) if p.eval.baseline and (p.steps or p.eval.kv_cache) else {}
    watch = start_watch(p, model, arch, tok, device)  # activation outliers (runs that quantize activations)
    result, records, calib_prov, t_quant = _quantize(p, model, arch, tok, device, out_dir, logger.log)
    if watch:
        watch.after_steps(model, folded=any(getattr(s, "folds_scales", False) for s in p.steps))
    kernels = swap_linears(model, result, p.modules)
    if p.fuse:
        kernels.update(_fuse(model, arch))
    kv = enable_kv_cache(model, p.eval.kv_cache)
    ppl, lm_eval, t_eval = _evaluate(p, model, tok, streams, fp, device)
    activations = watch.finish(model, out_dir, logger) if watch else None
    prov = provenance(device, p.seed) | {"calibration": calib_prov}
    run_info = RunInfo(model=p.model.name, method=p.recipe, tag=p.tag, **p.facts, modules=p.modules,
                       config_hash=chash, seed=p.seed, time=_now(), steps=records, commit=commit_label(prov),
                       eval_signature=eval_signature(ppl, lm_eval),
                       calib_samples=None if calib_prov is None else calib_prov["n_samples"])
    fp_info, memory = _footprint(p, model, result), peak_memory(device)  # peaks before the extras' own
    extras = _extras(p, model, tok, kernels, device, out_dir, export_source(run_info))
    memory["kernel_copies_bytes"] = derived_bytes(model)  # what packed kernels hold beside the stored buffers
    metrics = Metrics(run=run_info, model=model_info, ppl=ppl, footprint=fp_info, memory=memory,
                      timing=Timing(t_load, t_quant, t_eval),
                      kernels={k: sum(1 for v in kernels.values() if v == k) for k in sorted(set(kernels.values()))},
                      calibration=calib_prov, wandb=logger.status, lm_eval=lm_eval, wandb_run=logger.ref(),
                      activations=activations, **extras,
                      kv_cache=kv_cache_report(kv, p.eval.kv_cache, p.eval.seqlen, limit))
    _write(out_dir, cfg_dict, metrics, result, prov, logger)
    return metrics


def _fuse(model, arch) -> dict[str, str]:
    """fuse=true: sibling projections as one packed layer each; {member: kernel}; groups left unfused are printed
    with the reason."""
    from .nn.fused import fuse_siblings

    used = fuse_siblings(model, arch)
    left = {k: v for k, v in used.items() if v.startswith("not fused")}
    for label, why in sorted(left.items())[:3]:
        print(f"fuse: {label} {why}", flush=True)
    if len(left) > 3:
        print(f"fuse: {len(left) - 3} more groups not fused", flush=True)
    return {k: v for k, v in used.items() if k not in left}


def _write(out_dir: Path, cfg_dict: dict, metrics: Metrics, result: QuantResult, prov: dict, logger) -> None:
    """Per-layer table, provenance, config, then metrics.json last (its presence marks a complete run)."""
    from .artifacts import save_artifacts

    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg_dict))
    if result.stats:
        write_csv(out_dir / "layers.csv", result.stats)
    if result.artifacts:
        save_artifacts(out_dir / "artifacts.safetensors", result.artifacts)
    atomic_write_json(out_dir / "provenance.json", prov)
    data = metrics.to_dict()
    logger.summary(data)
    logger.table("layers", result.stats)
    atomic_write_json(out_dir / "metrics.json", data)
    append_index(Path(cfg_dict["paths"]["results"]) / "runs" / "index.jsonl", metrics.row(out_dir))
    print_summary(metrics, out_dir)
