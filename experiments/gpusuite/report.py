"""The suite's report: goals vs reached (pure function of the state) and the markdown rendering."""
from __future__ import annotations

# (label, variant, shape, M, target, note): kernel speedups over fp16 torch.matmul, from the benchmark section
KERNEL_GOALS = [("W4A16 g128 speedup at M=1, 4096x11008", "w4a16_g128", "4096x11008", 1, 3.5, "limit 3.88x"),
                ("W4A16 g128 speedup at M=16, 4096x11008", "w4a16_g128", "4096x11008", 16, 2.5, ""),
                ("W8A8 speedup at M=2048, 4096x11008", "w8a8", "4096x11008", 2048, 1.5, "")]
DECODE_GOAL = ("decode tok/s, 7B-shaped, batch 1: packed W4 / fp16", 2.5)
GRAPH_GOAL = ("decode tok/s, 7B-shaped, batch 1, CUDA-graph step: packed W4 / fp16", 2.5)
GPTQ_REF_GOAL = ("GPTQ solver vs the reference, same W and H, identical output (7B shapes, act-order off / on)", 1.5)
GPTQ_REF_CELLS = 6  # 3 Llama-2-7B layer shapes x act-order off / on (gpusuite/gptq_reference.py)


def _why_missing(state: dict, section: str, quick: bool) -> str:
    if quick:
        return "CPU quick mode (tiny shapes, torch reference)"
    sec = state["sections"].get(section, {})
    return f"section {section} {sec.get('status', 'not run')}" + (f": {sec['reason']}" if sec.get("reason") else "")


def _goal(label, target, value, kernel_ok: bool, note: str, why: str) -> dict:
    if value is None:
        return {"goal": label, "target": f">= {target}x", "reached": "-", "status": "NOT MEASURED", "note": why}
    status = ("MET" if value >= target else "MISSED") if kernel_ok else "NOT A GPU KERNEL"
    return {"goal": label, "target": f">= {target}x", "reached": f"{value:.2f}x", "status": status, "note": note}


def goals(state: dict) -> list[dict]:
    """One row per goal of the performance issue: MET / MISSED / NOT MEASURED (with the reason)."""
    quick = state["meta"]["quick"]
    rows = state["sections"].get("kernels", {}).get("rows", [])
    out = []
    for label, variant, shape, m, target, note in KERNEL_GOALS:
        hit = [r for r in rows if (r["variant"], r["shape"], r["M"]) == (variant, shape, m)]
        r = hit[0] if hit else None
        if r is not None and variant == "w8a8":
            others = [f"{o['shape']} {o['speedup']:.2f}x" for o in rows if o["variant"] == variant and o["M"] == m
                      and o["shape"] != shape]
            note = "other shapes: " + ", ".join(others) if others else note
        fl = [f for f in state["sections"].get("kernels", {}).get("floor", []) if f["shape"] == shape]
        if fl and variant.startswith("w4"):
            note = (f"{note}; read floor {fl[0]['w4_us']:.1f} us (W4 codes) vs {fl[0]['fp16_us']:.1f} us (fp16 "
                    f"weight): {fl[0]['ratio']:.2f}x before fixed per-call costs")
        parts = [p for p in state["sections"].get("kernels", {}).get("w8a8_parts", [])
                 if (p["shape"], p["M"]) == (shape, m)]
        if parts and variant == "w8a8" and parts[0]["cublas_int8_us"] is not None:
            p = parts[0]
            note = (f"{note}; act quant {p['act_quant_us']:.1f} us + our GEMM {p['gemm_us']:.1f} us vs cuBLAS int8 "
                    f"{p['cublas_int8_us']:.1f} us: cuBLAS bound {p['cublas_bound']:.2f}x")
        if r is not None:
            note = f"{note}; kernel {r['kernel']}".strip("; ")
        out.append(_goal(label, target, r["speedup"] if r else None, bool(r and r["kernel"].startswith("triton_")),
                         note, _why_missing(state, "kernels", quick)))
    e2e = {(r["model"], r["variant"]): r for r in state["sections"].get("e2e", {}).get("rows", []) if "decode" in r}
    fp, w4 = e2e.get(("llama2_7b", "fp16")), e2e.get(("llama2_7b", "w4_g128"))
    value, note = None, ""
    if fp and w4 and not quick:
        value = w4["decode"]["1"] / fp["decode"]["1"]
        note = (f"{w4['decode']['1']:.1f} vs {fp['decode']['1']:.1f} tok/s, {w4['layers']} layers, eager HF decode; "
                f"W4 {w4['decode_ms_per_step']['1']:.1f} ms/step vs weight-read floor {w4['step_floor_ms']:.2f}; "
                f"kernels {', '.join(w4['kernels'])}")
        fused = w4.get("fused", {}).get("decode", {})
        if "1" in fused and fused["1"] / fp["decode"]["1"] > value:  # fuse=true is a packed W4 model too
            value = fused["1"] / fp["decode"]["1"]
            note = f"fused (fuse=true) {fused['1']:.1f} tok/s; unfused: {note}"
    gpu_kernels = bool(w4 and all(k.startswith("triton_") for k in w4["kernels"]))
    gfp, gw4 = ((r or {}).get("graph_decode", {}).get("1", {}) for r in (fp, w4))
    if value is not None and "ms_per_step" in gfp:  # how much of fp16's own eager step is host time
        note = (f"{note}; fp16 eager {fp['decode_ms_per_step']['1']:.1f} ms/step vs its CUDA-graph step "
                f"{gfp['ms_per_step']:.2f}: eager decode is host-bound for fp16 too")
    out.append(_goal(DECODE_GOAL[0], DECODE_GOAL[1], value, gpu_kernels, note, _why_missing(state, "e2e", quick)))
    value, note, why = None, "", _why_missing(state, "e2e", quick)
    gw4f = (w4 or {}).get("fused", {}).get("graph_decode", {}).get("1", {})
    fused_best = "ms_per_step" in gw4f and "ms_per_step" in gw4 and gw4f["ms_per_step"] < gw4["ms_per_step"]
    if "ms_per_step" in gfp and "ms_per_step" in gw4 and gw4.get("graph") and not quick:
        unfused = f"; unfused W4 {gw4['ms_per_step']:.2f} ms/step" if fused_best else ""
        gw4 = gw4f if fused_best else gw4
        value = gfp["ms_per_step"] / gw4["ms_per_step"]
        note = (f"{gw4['tokens_per_s']:.1f} vs {gfp['tokens_per_s']:.1f} tok/s; W4 {gw4['ms_per_step']:.2f} ms/step "
                f"vs weight-read floor {w4['step_floor_ms']:.2f}")
        split = step_split(state, gfp["ms_per_step"], w4["layers"])
        if split:
            note = (f"{note}; fp16 step {gfp['ms_per_step']:.2f} ms = {split['fp16_linears_ms']:.2f} in its block "
                    f"linears (kernel section, M = 1) + {split['other_ms']:.2f} else; block linears at the W4 read "
                    f"floor ({split['w4_floor_ms']:.2f} ms) would give {split['bound']:.2f}x")
        note = ("fused (fuse=true); " if fused_best else "") + note + unfused
    elif gfp.get("error") or gw4.get("error"):
        why = f"graph decode failed: {gfp.get('error') or gw4.get('error')}"
    out.append(_goal(GRAPH_GOAL[0], GRAPH_GOAL[1], value, gpu_kernels, note, why))
    out.append(gptq_ref_goal(state))
    return out


LLAMA_LAYER = {"4096x4096": 4, "11008x4096": 2, "4096x11008": 1}  # Llama-2-7B block linears per shape (out x in)


def step_split(state: dict, fp16_step_ms: float, layers: int) -> dict | None:
    """The fp16 CUDA-graph decode step split into its block linears (the kernel section's fp16 M = 1 times, one
    kernel each, L2 flushed) and the rest; and the step with every block linear at the W4 read floor (floor
    section: one read of the codes, no qparams). None without those rows."""
    k = state["sections"].get("kernels", {})
    fp16 = {r["shape"]: r["fp16_ms"] for r in k.get("rows", []) if r.get("M") == 1 and r.get("variant") == "w4a16_g128"
            and r.get("fp16_ms") is not None}
    floor = {f["shape"]: f["w4_us"] for f in k.get("floor", [])}
    if not all(s in fp16 and s in floor for s in LLAMA_LAYER):
        return None
    lin = layers * sum(n * fp16[s] for s, n in LLAMA_LAYER.items())
    w4 = layers * sum(n * floor[s] for s, n in LLAMA_LAYER.items()) / 1e3
    other = fp16_step_ms - lin
    return {"fp16_linears_ms": lin, "other_ms": other, "w4_floor_ms": w4, "bound": fp16_step_ms / (other + w4)}


def gptq_ref_goal(state: dict) -> dict:
    """The slowest cell's speedup over the reference; NOT IDENTICAL when any cell's output differs from it."""
    label, target = GPTQ_REF_GOAL
    rows = state["sections"].get("gptq_ref", {}).get("rows", [])
    if state["meta"]["quick"] or not rows:
        return _goal(label, target, None, False, "", _why_missing(state, "gptq_ref", state["meta"]["quick"]))
    worst = min(rows, key=lambda r: r["speedup"])
    differ = [f"{r['shape']} ao={int(r['act_order'])}: {r['codes_differing']:.3%} codes differ" for r in rows
              if not all(r["identical"].values())]
    note = (f"slowest: {worst['shape']} act-order {'on' if worst['act_order'] else 'off'} ({worst['ours_s']:.3f} vs "
            f"{worst['reference_s']:.3f} s); {len(rows)} of {GPTQ_REF_CELLS} cells")
    g = _goal(label, target, worst["speedup"], True, note + ("; " + "; ".join(differ) if differ else ""), "")
    if differ:
        g["status"] = "NOT IDENTICAL"
    return g


def _f(v, fmt=".3g"):
    return "-" if v is None else format(v, fmt)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _status_line(sec: dict) -> str:
    s = f"status: **{sec.get('status', 'not run')}**"
    if sec.get("seconds") is not None:
        s += f", {sec['seconds']:.1f} s"
    for k in ("reason", "error"):
        if sec.get(k):
            s += f"; {k}: {sec[k]}"
    return s + ("; skipped parts: " + "; ".join(sec["skipped"]) if sec.get("skipped") else "")


def _env(sec: dict) -> list[str]:
    keys = ["device", "date", "commit", "commit_source", "driver_version", "cuda", "torch", "triton", "transformers",
            "python", "capability", "sm_count", "memory_gib", "l2_mib", "clocks.sm", "clocks.max.sm", "power.limit",
            "cpu", "cpu_count", "load_avg", "triton_interpret", "qresearch_small_m", "qresearch_prefill",
            "qresearch_gemv_magic"]
    lines = [f"- {k}: {sec[k]}" for k in keys if k in sec]
    if "copy_bw_gbs" in sec:
        lines.append(f"- measured device copy bandwidth: {sec['copy_bw_gbs']:.0f} GB/s (read + write)")
    if "matmul_tflops" in sec:
        lines.append(f"- measured matmul: {sec['matmul_tflops']:.1f} TFLOP/s ({sec['matmul_desc']})")
    return lines


def _correctness(sec: dict) -> list[str]:
    rows = sec.get("rows", [])
    lines = [f"{sum(r['status'] == 'PASS' for r in rows)} / {len(rows)} PASS (of {sec.get('n_cases', '?')} cases) "
             f"on {sec.get('executor', '?')}. Error vs float64 truth of the packed buffers: max abs, and rel = "
             f"||y - truth||_F / ||truth||_F; 'ref rel' = the torch reference's rel error in the same dtype. "
             f"PASS: finite, right shape/dtype, rel <= tol ({sec.get('tolerances')}).", ""]
    body = [[r["case"], r["path"], _f(r.get("max_abs")), _f(r.get("rel")), _f(r.get("ref_rel")), _f(r["tol"]),
             r["status"], r.get("note", "")] for r in rows]
    return lines + _table(["case", "path", "max abs", "rel", "ref rel", "tol", "status", "note"], body)


def _peer(sec: dict) -> list[str]:
    """torch's int4 GEMM (experiments/gpusuite/peer.py) and our W4 in bf16, each vs bf16 torch.matmul."""
    if not (sec.get("peer") or sec.get("peer_errors")):
        return []
    ours = {(r["shape"], r["M"]): r for r in sec.get("peer_ours_bf16", [])}
    lines = ["", "Peer: torch's int4 weight-only GEMM (tinygemm, `aten._weight_int4pack_mm`, W4 g128, bf16 "
             "activations) vs bf16 torch.matmul on the same weight, timed as the rows above; 'ours' = our packed W4 "
             "g128 in bf16 vs bf16 matmul (goal shape only). rel err: vs float64 on the same codes and qparams "
             "(matmul's own in brackets); nibble order: which code of a pair the op reads from the high bits.", ""]
    body = []
    for r in sec.get("peer", []):
        o = ours.get((r["shape"], r["M"]))
        if r["status"] == "FAIL" and "q_ms" not in r:
            body.append([r["shape"], r["M"], r["kernel"], "-", "-", "-", "-", "-",
                         f"FAIL {r.get('rel_err_by_order')}", "-", r["status"]])
            continue
        body.append([r["shape"], r["M"], r["kernel"], f"{r['fp16_ms'] * 1e3:.1f}", f"{r['q_ms'] * 1e3:.1f}",
                     f"{r['speedup']:.2f}x", f"{r['eager_speedup']:.2f}x",
                     "-" if o is None else f"{o['q_ms'] * 1e3:.1f} us, {o['speedup']:.2f}x ({o['kernel']})",
                     f"{r['rel_err']:.1e} [{r['matmul_rel_err']:.1e}]", r["nibble_order"], r["status"]])
    lines += _table(["shape", "M", "kernel", "bf16 matmul us", "int4 us", "speedup", "eager speedup", "ours",
                     "rel err", "nibble order", "status"], body)
    return lines + [f"- peer error: {e}" for e in sec.get("peer_errors", [])]


def _kernels(sec: dict) -> list[str]:
    lines = [f"Activations {sec.get('dtype')}; {sec.get('timing')}; {sec.get('repeats')} repeats after "
             f"{sec.get('warmup')} warm-up calls (the warm-up compiles and autotunes). ms and speedup: CUDA-graph "
             "replays where timing = cuda_graph (kernel time), else eager; eager speedup includes the host launch "
             "overhead of every call. bw = (packed weight + qparam + activation bytes) / time / copy bandwidth; "
             "limit = 16 / (bits + qparam bits per weight). ref err = rel. error of the kernel's output vs the "
             f"torch reference on the same module (check: {sec.get('ref_check', '-')}).", ""]
    body = [[r["shape"], r["M"], r["variant"], r["kernel"], f"{r['fp16_ms']:.4f}", f"{r['q_ms']:.4f}",
             f"{r['speedup']:.2f}x", f"{r['eager_speedup']:.2f}x", f"{r['bw_frac']:.2f}", f"{r['fp16_bw_frac']:.2f}",
             f"{r['limit']:.2f}x", _f(r.get("ref_rel_err"), ".1e"),
             r["timing"] + (f" ({r['graph_error']})" if r.get("graph_error") else "")] for r in sec.get("rows", [])]
    lines += _table(["shape (out x in)", "M", "variant", "kernel", "fp16 ms", "quant ms", "speedup",
                     "eager speedup", "bw / copy", "fp16 bw / copy", "limit", "ref err", "timing"], body)
    if sec.get("floor"):
        lines += ["", "Read floor: one Triton kernel that only reads the weight's bytes (xor-reduce; best of a few "
                  "tiles; CUDA-graph replay, L2 flushed). No kernel that reads these bytes once can be faster; "
                  "fp16 / W4 bounds the W4 speedup before the fixed cost of a call.", ""]
        lines += _table(["shape", "W4 g128 codes us", "GB/s", "fp16 weight us", "GB/s", "fp16 / W4"],
                        [[f["shape"], f"{f['w4_us']:.1f}", f"{f['w4_gbs']:.0f}", f"{f['fp16_us']:.1f}",
                          f"{f['fp16_gbs']:.0f}", f"{f['ratio']:.2f}x"] for f in sec["floor"]])
    lines += _peer(sec)
    if sec.get("tuned"):
        lines += ["", "Tiles the tuned kernels chose (per layer key; `experiments/compile_kernels.py` shows what each "
                  "compiles to):", ""]
        lines += _table(["kernel", "key", "tile"], [[t["kernel"], t["key"], str(t["tile"])] for t in sec["tuned"]])
    if sec.get("host_overhead") or sec.get("host_overhead_error"):
        lines += ["", "Host time per eager call at M = 1, and at the M of the M= rows (experiments/gpusuite/launch.py): "
                  "wall time of back-to-back calls on a small layer (GPU work of a few us), one synchronize at the "
                  "end; 'vs fp16' against F.linear at the same M; identical = the launch path's output equals the "
                  "JIT launch's bits.", ""]
        lines += _table(["path", "us / call", "vs fp16 F.linear", "identical", "error"],
                        [[h["path"], _f(h.get("us"), ".1f"), _x(h.get("vs_fp16")),
                          {True: "yes", False: "NO"}.get(h.get("identical"), "-"), h.get("error", "")]
                         for h in sec.get("host_overhead", [])])
        if sec.get("host_overhead_error"):
            lines += ["", f"host-time probe failed: {sec['host_overhead_error']}"]
    if sec.get("w8a8_parts"):
        lines += ["", "W8A8 call in parts (us; CUDA-graph replays, L2 flushed): the per-token activation quantizer, "
                  "our int8 GEMM with its rescale epilogue, and cuBLAS's int8 GEMM (torch._int_mm, int32 out, no "
                  "epilogue) on the same int8 operands. Act quant by row block: the quantizer in two passes over "
                  "x with that row block (the default reads rows up to 8192 wide once, wider ones in two passes over 4096-wide blocks; ! = output not the "
                  "default's bits). cuBLAS bound = fp16 / (act quant + cuBLAS int8): the speedup "
                  "with cuBLAS's GEMM and a free epilogue. GEMM rel err: our GEMM's output vs cuBLAS's integer sums "
                  "rescaled in float64. cuBLAS fp8: torch._scaled_mm on e4m3 operands with row-wise scales (bf16 "
                  "out) at the same shape; fp8 bound = fp16 / (act quant + cuBLAS fp8).", ""]
        lines += _table(["shape", "M", "fp16", "W8A8 call", "speedup", "act quant", "act quant by row block",
                         "our GEMM", "cuBLAS int8", "cuBLAS / ours", "cuBLAS bound", "GEMM rel err", "cuBLAS fp8",
                         "fp8 bound"],
                        [[p["shape"], p["M"], f"{p['fp16_us']:.1f}", f"{p['call_us']:.1f}", f"{p['speedup']:.2f}x",
                          f"{p['act_quant_us']:.1f}", _blocks(p.get("act_quant_blocks")), f"{p['gemm_us']:.1f}",
                          _f(p["cublas_int8_us"], ".1f"),
                          _x(p["gemm_vs_cublas"]), _x(p["cublas_bound"]),
                          _f(p["gemm_rel_err"], ".1e") if p["cublas_int8_us"] is not None else p["cublas_error"],
                          _f(p.get("fp8_us"), ".1f") if p.get("fp8_us") is not None else p.get("fp8_error", "-"),
                          _x(p.get("fp8_bound"))]
                         for p in sec["w8a8_parts"]])
    return lines


def _blocks(rows: list[dict] | None) -> str:
    """'1024: 21.0 / 2048: 19.5' (us per two-pass row block; '!' marks output differing from the default's)."""
    if not rows:
        return "-"
    return " / ".join(f"{r['block']}: {r['us']:.1f}{'' if r['identical'] else '!'}" for r in rows)


def _repeats(ms: list[float] | None) -> str:
    """' (70.1, 69.0, 68.7)': every timed repeat in order, where they spread by more than 10% (a warm-up effect
    shows as a slow first repeat); '' otherwise."""
    if not ms or max(ms) <= 1.1 * min(ms):
        return ""
    return " (" + ", ".join(f"{v:.1f}" for v in ms) + ")"


E2E_HEADER = ["model", "variant", "layers x hidden dtype", "kernels", "prefill ms (tokens)", "decode tok/s",
              "decode vs fp16", "ms / step", "floor ms / step", "weights GiB", "peak GiB", "logits rel", "error"]


def _e2e_row(r: dict, base: dict | None) -> list:
    if "error" in r:
        return [r["model"], r["variant"]] + ["-"] * (len(E2E_HEADER) - 3) + [f"ERROR {r['error']}"]
    dec = r["decode"]
    ratio = "-" if base is None or base is r else " / ".join(
        f"b{k}: {v / base['decode'][k]:.2f}x" for k, v in dec.items() if k in base["decode"])
    peak = r["peak_cuda_bytes"] / 2**30 if r.get("peak_cuda_bytes") else None
    logits = _f(r.get("logits_rel_vs_ref"), ".1e") + (f" {r['logits_flag']}" if "logits_flag" in r else "")
    return [r["model"], r["variant"], f"{r['layers']} x {r['hidden']} {r['dtype']}",
            ", ".join(f"{k} x{v}" for k, v in r["kernels"].items()),
            " / ".join(f"{k}: {v:.1f}{_repeats(r.get('prefill_all_ms', {}).get(k))}" for k, v in r["prefill"].items()),
            " / ".join(f"b{k}: {v:.1f}" for k, v in dec.items()), ratio,
            " / ".join(f"b{k}: {v:.2f}" for k, v in r["decode_ms_per_step"].items()), f"{r['step_floor_ms']:.2f}",
            f"{r['weight_bytes'] / 2**30:.2f}", _f(peak), logits, ""]


def _e2e(sec: dict) -> list[str]:
    rows = [r for r in sec.get("rows", []) if "decode" in r]
    prompt = rows[0]["decode_prompt_tokens"] if rows else "?"
    lines = [f"Weights: {sec.get('weights')}. Latency protocol: {sec.get('latency', {})}. Decode tok/s = batch x "
             f"new tokens / time (after a {prompt}-token prompt); floor = all weight bytes / copy bandwidth (one "
             "read per decode step); peak = CUDA allocator peak during the measurement; logits rel = packed "
             "kernels vs torch reference, one 128-token forward. Prefill ms: median of the repeats; in parentheses every "
             "repeat in order where they spread by more than 10%."]
    lines += [f"- note: {n}" for n in sec.get("notes", [])] + [""]
    fp = {r["model"]: r for r in rows if r["variant"] == "fp16"}
    return lines + _table(E2E_HEADER, [_e2e_row(r, fp.get(r["model"])) for r in sec.get("rows", [])]) + \
        _fused_table(rows, fp) + _graph_table(rows, fp)


def _fused_table(rows: list[dict], fp: dict) -> list[str]:
    """Eager decode of the packed models with q/k/v and gate/up fused (fuse=true) vs unfused and fp16."""
    body = []
    for r in rows:
        f = r.get("fused")
        if f is None:
            continue
        if "error" in f:
            body.append([r["model"], r["variant"], "-", "-", "-", "-", "-", f"ERROR {f['error']}"])
            continue
        base = fp.get(r["model"], {}).get("decode", {})
        body.append([r["model"], r["variant"], ", ".join(f"{k} x{v}" for k, v in f["kernels"].items()),
                     " / ".join(f"b{k}: {v:.1f}" for k, v in f["decode"].items()),
                     " / ".join(f"b{k}: {v / r['decode'][k]:.2f}x" for k, v in f["decode"].items() if k in r["decode"]),
                     " / ".join(f"b{k}: {v / base[k]:.2f}x" for k, v in f["decode"].items() if k in base),
                     f"{f['logits_rel_vs_unfused']:.1e}", "; ".join(f["not_fused"])])
    if not body:
        return []
    return ["", "Fused sibling projections (fuse=true: q/k/v and gate/up as one packed layer each), the same model, "
            "eager decode after the same prompt; logits rel = fused vs unfused packed model, one 128-token forward:",
            ""] + _table(["model", "variant", "kernels", "decode tok/s", "vs unfused", "vs fp16", "logits rel",
                          "not fused"], body)


def _graph_table(rows: list[dict], fp: dict) -> list[str]:
    """Static-cache decode with one CUDA graph per step (eager on CPU): tok/s and ratio to fp16 per batch."""
    body = []
    runs = [(r, r["graph_decode"], r["variant"]) for r in rows if "graph_decode" in r]
    runs += [(r, r["fused"]["graph_decode"], r["variant"] + " fused") for r in rows
             if "graph_decode" in r.get("fused", {})]
    for r, graph, label in sorted(runs, key=lambda t: (rows.index(t[0]), t[2])):
        for b, g in graph.items():
            if "error" in g:
                body.append([r["model"], label, b, "-", "-", "-", f"ERROR {g['error']}"])
                continue
            base = fp.get(r["model"], {}).get("graph_decode", {}).get(b, {})
            ratio = f"{base['ms_per_step'] / g['ms_per_step']:.2f}x" if "ms_per_step" in base else "-"
            body.append([r["model"], label, b, f"{g['tokens_per_s']:.1f}", f"{g['ms_per_step']:.3f}", ratio,
                         "CUDA graph" if g["graph"] else "eager (no CUDA)"])
    if not body:
        return []
    return ["", "Static KV cache, greedy decode after a 16-token prompt, one captured step replayed per token "
            "(median of 3 runs):", ""] + _table(["model", "variant", "batch", "tok/s", "ms / step", "vs fp16",
                                                 "mode"], body)


def _gptq(sec: dict) -> list[str]:
    if "method_total_s" not in sec and "capture_s" not in sec:
        return []
    lines = [f"{sec.get('model')}; calibration {sec.get('samples')} x {sec.get('seqlen')} tokens "
             f"({sec.get('tokens')} hidden states), batch {sec.get('batch_size')}; {sec.get('method')}."]
    if sec.get("note"):
        lines.append(f"- note: {sec['note']}")
    if sec.get("column_loop"):
        lines.append(f"- column loop of the method's solves: {sec['column_loop']}")
    lines += ["", *_table(["step", "seconds"], [
        ["capture block-0 inputs", _f(sec.get("capture_s"), ".2f")],
        ["Hessians of q/o/gate/down inputs, one pass", _f(sec.get("hessians_s"), ".2f")],
        ["GPTQ method total (true-sequential)", _f(sec.get("method_total_s"), ".2f")],
        ["  of which solves (7 linears)", _f(sec.get("solve_total_s"), ".2f")],
        ["  of which Hessians + block forwards + capture", _f(sec.get("other_s"), ".2f")]])]
    if sec.get("solve_s"):
        lines += ["", "Solve seconds per linear: " + ", ".join(f"{k} {v:.2f}" for k, v in sec["solve_s"].items())]
    if sec.get("loop_ab"):
        lines += ["", "GPTQ column loop, one solve per layer on block 0's Hessian: the int format's own loop (Triton "
                  "kernel on CUDA, C on CPU) vs the format path's torch ops (a dozen small ops per column):", "",
                  *_table(["layer", "W [out x in]", "loop", "loop s", "format path s", "speedup", "identical"], [
                      [r["layer"], "x".join(map(str, r["shape"])), r["loop"], _f(r["int_loop_s"], ".3f"),
                       _f(r["format_path_s"], ".3f"), f"{r['speedup']:.1f}x", "yes" if r["identical"] else "NO"]
                      for r in sec["loop_ab"]])]
    return lines


def _gptq_ref(sec: dict) -> list[str]:
    if not sec.get("rows") and not sec.get("skipped"):
        return []
    sha = ", ".join(f"{k} {v}" for k, v in sec.get("files_sha256", {}).items())
    lines = [f"Ours (`gptq_quantize`, exact inverse factor) vs the reference's `fasterquant` from "
             f"`{sec.get('reference')}` (SHA-256 {sha}), {sec.get('setting')}; seconds are the best of "
             f"{sec.get('repeat')} alternating runs after one untimed run of each, the device synchronized around "
             "each. *Identical*: our codes, scales, zeros and dequantized weight equal the reference's (its codes and "
             "qparams recorded through its `quantize` in one more run).", ""]
    lines += _table(["W [out x in]", "act-order", "ours s", "reference s", "reference / ours", "identical",
                     "codes differ"],
                    [[r["shape"], "on" if r["act_order"] else "off", _f(r["ours_s"], ".3f"),
                      _f(r["reference_s"], ".3f"), f"**{r['speedup']:.2f}x**", "yes" if all(r["identical"].values())
                      else "NO: " + ", ".join(k for k, v in r["identical"].items() if not v),
                      f"{r['codes_differing']:.3%}"]
                     for r in sec.get("rows", [])])
    if sec.get("skipped"):
        lines += ["", "Not run (budget): " + "; ".join(sec["skipped"])]
    return lines


SECTIONS = [("env", "1. Environment", _env), ("correctness", "2. Kernel correctness on the device", _correctness),
            ("kernels", "3. Kernel benchmark, Llama-2-7B layer shapes", _kernels),
            ("e2e", "4. End to end: prefill and decode", _e2e), ("gptq", "5. GPTQ calibration of one 7B block", _gptq),
            ("gptq_ref", "6. GPTQ solver vs the reference implementation", _gptq_ref)]


def markdown(state: dict) -> str:
    meta = state["meta"]
    env = state["sections"].get("env", {})
    title = f"# GPU suite on {env.get('device', meta.get('device', '?'))}"
    lines = [title + (" (CPU quick mode)" if meta["quick"] and not meta["gpu"] else ""), ""]
    if not meta["gpu"]:
        lines += ["**CPU quick mode: tiny shapes; Triton kernels run by the interpreter (correctness only); the "
                  "benchmark and end-to-end sections run the torch reference kernels. No number here is a GPU "
                  "measurement; the goals are NOT measured.**", ""]
    tc = meta.get("triton_cache")
    cache = [] if not tc else [
        f"- Triton compile cache: {tc['carried_entries']} kernels carried in, {tc['compiled_this_run']} compiled "
        f"this run; " + (f"written back ({tc['archive_bytes'] / 2**20:.1f} MiB)" if tc.get("written")
                         else f"not written back: {tc.get('why_not')}")]
    lines += [f"- command: `{meta['command']}`", f"- budget: {meta['budget_s']:.0f} s, used {meta['used_s']:.0f} s; "
              f"finished: {meta['finished']}", *cache, "", "## Goals", "",
              *_table(["goal", "target", "reached", "status", "note"],
                      [list(g.values()) for g in goals(state)]), ""]
    for key, heading, render in SECTIONS:
        sec = state["sections"].get(key, {})
        lines += [f"## {heading}", "", _status_line(sec), ""]
        if sec.get("status") in ("done", "error", "interrupted", "running"):
            lines += [*render(sec), ""]
    return "\n".join(lines) + "\n"


def short_summary(state: dict) -> str:
    """Goals and section statuses in a few lines (printed last)."""
    lines = ["== GPU suite summary =="]
    for name, sec in state["sections"].items():
        extra = sec.get("error") or sec.get("reason") or ""
        if name == "correctness" and "rows" in sec:
            extra = f"{sec.get('passed', '?')}/{len(sec['rows'])} PASS" + (f"; failed: {sec['failed'][:5]}"
                                                                           if sec.get("failed") else "")
        lines.append(f"{name:12} {sec.get('status', '?'):11} {sec.get('seconds', 0):6.1f} s  {extra}"[:300])
    lines += [f"{g['status']:16} {g['reached']:>7} (target {g['target']}) {g['goal']}" for g in goals(state)]
    return "\n".join(lines)
