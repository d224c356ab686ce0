"""End-of-run terminal summary."""
from __future__ import annotations

from pathlib import Path

from .metrics import Metrics


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"
    return "-" if x is None else str(x)


def summary_lines(m: Metrics, run_dir: Path) -> list[str]:
    r, fpt = m.run, m.footprint
    lines = [f"== {r.model} / {r.tag} (modules={r.modules})  ->  {run_dir}"]
    if m.model.weights_note:
        lines.append(f"   note: {m.model.weights_note}")
    if m.model.exported_by:
        e = m.model.exported_by
        lines.append(f"   exported by: {e.get('model')} / {e.get('tag')} (config hash {e.get('config_hash')}, "
                     f"code {e.get('commit')})")
    lines.append(f"   {'dataset':<10} {'split':<11} {'seqlen':>6} {'tokens':>8} {'FP ppl':>10} {'ppl':>10} {'delta':>9}")
    for ds, p in m.ppl.items():
        lines.append(f"   {ds:<10} {p.split:<11} {p.seqlen:>6} {p.n_tokens:>8} "
                     f"{_fmt(p.fp_ppl):>10} {_fmt(p.ppl):>10} {_fmt(p.delta_ppl):>9}")
    lines.append(f"   weights: {fpt.weight_bytes / 2**20:.3f} MiB stored ({fpt.bits_per_weight:.3f} bits/weight "
                 f"on quantized linears; fp16 {fpt.weight_bytes_fp16 / 2**20:.3f} MiB, x{fpt.compression:.2f})")
    if m.kv_cache:
        kv, last = m.kv_cache, m.kv_cache["cache"][-1]
        lines.append(f"   kv cache: {kv['qformat']}{kv['bits']} per token and head ({last['bits_per_value']:.2f} bits/value); "
                     f"{last['bytes'] / 2**20:.2f} MiB at {last['context']} tokens (fp16 {last['fp16_bytes'] / 2**20:.2f})")
    t, copies = m.timing, m.memory.get("kernel_copies_bytes")
    copies = f" (packed kernels' own copies {copies / 2**20:.1f} MiB)" if copies else ""
    lines.append(f"   time: load {t.load_seconds:.1f}s, quantize {t.quantize_seconds:.1f}s, "
                 f"eval {t.eval_seconds:.1f}s; peak RSS {m.memory['peak_rss_bytes'] / 2**30:.2f} GiB{copies}; "
                 f"wandb: {m.wandb}")
    return lines


def print_summary(m: Metrics, run_dir: Path) -> None:
    print("\n".join(summary_lines(m, run_dir)), flush=True)
