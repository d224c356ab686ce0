"""Our RTN / GPTQ / AWQ vs llm-compressor's at the same bits, group and calibration windows (issue 16): perplexity,
bytes and quantization time side by side, and llm-compressor's checkpoint evaluated by our loader
(model.source=compressed_tensors) next to llm-compressor's own in-memory model. Writes results/peers.{md,json}.

    python experiments/peers.py                                   # both models (CPU: about an hour)
    python experiments/peers.py --models stories260k --methods rtn

llm-compressor pins transformers <= 5.17, so it runs in its own virtual environment (.venvs/llmcompressor, built by
experiments/peers/setup_venv.sh on first use) through experiments/peers/llmc_worker.py. Both sides get the same C4
windows (qresearch.data.tokens.calibration_ids, written to a file) and the same eval chunks (written to a file, and
scored by the same qresearch.eval.ppl code). Resumable: finished cells are read back, not rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from qresearch.tracking.metrics import Metrics  # noqa: E402

WORK = REPO / "results" / "runs" / "peers"
VENV = REPO / ".venvs" / "llmcompressor"
BITS, SEED = 4, 0
# per model (CPU budget, stated in the table): eval chunks, calibration windows x length, groups to try, and
# whether ours also runs where llm-compressor refuses the group (SmolLM2 g128: see results/gptq_awq.md instead)
MODELS = {
    "stories260k": {"chunks": 200, "n_samples": 128, "calib_seqlen": 256, "groups": [-1, 32], "ours_if_refused": True},
    "smollm2_135m": {"chunks": 40, "n_samples": 32, "calib_seqlen": 512, "groups": [64, 128], "ours_if_refused": False},
}
METHODS = ("rtn", "gptq", "awq")


def sh(cmd: list[str], log: Path, env: dict | None = None) -> int:
    """Run `cmd` from the repo root, output to `log`; the command line is recorded by the caller."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode


def show(cmd: list[str]) -> str:
    """A command with this machine's folders replaced by the variables that name them."""
    text = " ".join(shlex.quote(c) for c in cmd)
    for var, path in (("$QRESEARCH_CACHE", os.environ.get("QRESEARCH_CACHE")), ("$QRESEARCH_SHARED",
                      os.environ.get("QRESEARCH_SHARED")), (".", str(REPO))):
        if path:
            text = text.replace(str(Path(path).resolve()), var).replace(path, var)
    return text


def model_inputs(model: str, s: dict) -> dict:
    """HF folder (SmolLM2: the harness's converted GGUF in $QRESEARCH_CACHE/models), calibration windows and eval
    chunks as files for the worker; the windows' hash must equal the one our runs record."""
    import torch

    from qresearch.config import plan
    from qresearch.data.tokens import calibration_ids, eval_tokens, hash_ids
    from qresearch.models.load import _gguf_converted, load_tokenizer, resolve_path

    p = plan(compose_cfg([f"model={model}", "method=gptq", "data=c4"]))
    folder = _gguf_converted(p.model, resolve_path(p.model)) if p.model.source == "gguf" else resolve_path(p.model)
    tok = load_tokenizer(p.model)
    out = WORK / model / "inputs"
    out.mkdir(parents=True, exist_ok=True)
    calib, prov = calibration_ids("c4", tok, s["n_samples"], s["calib_seqlen"], SEED, p.calib["root"], "local")
    seqlen = int(compose_cfg([f"model={model}"]).model.seqlen)
    ids, _ = eval_tokens("wikitext2", "test", p.eval.root, tok, "local")
    torch.save(calib, out / "calib.pt")
    torch.save(ids[:, : s["chunks"] * seqlen].clone(), out / "eval.pt")
    return {"folder": folder, "seqlen": seqlen, "calib_hash": hash_ids(calib), "calib_prov": prov,
            "note": p.model.weights_note}


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import qresearch.config  # noqa: F401 (resolvers)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def ours(model: str, method: str, group: int, s: dict) -> dict:
    out = WORK / model / f"ours-{method}-g{group}"
    cmd = ["python", "run.py", f"model={model}", f"method={method}", f"bits={BITS}", f"group_size={group}", "sym=false",
           f"seed={SEED}", "data=c4", "data.source=local", f"data.n_samples={s['n_samples']}",
           f"data.seqlen={s['calib_seqlen']}", f"eval.max_chunks={s['chunks']}", "logger=none", f"out_dir={out}"]
    if not (out / "metrics.json").is_file():
        sh([sys.executable, *cmd[1:]], out.with_suffix(".log"))
    return _metrics_cell(out, cmd)


def _metrics_cell(out: Path, cmd: list[str]) -> dict:
    if not (out / "metrics.json").is_file():
        return {"status": "error", "command": show(cmd), "log": show([str(out.with_suffix(".log"))])}
    m = Metrics.from_dict(json.loads((out / "metrics.json").read_text()), str(out))
    ppl = m.ppl["wikitext2"]
    return {"status": "ok", "command": show(cmd), "ppl": ppl.ppl, "n_tokens": ppl.n_tokens, "fp_ppl": ppl.fp_ppl,
            "weight_bytes": m.footprint.weight_bytes, "bits_per_weight": m.footprint.bits_per_weight,
            "measured_packed_bytes": m.footprint.measured_packed_bytes, "quantize_seconds": m.timing.quantize_seconds,
            "calib_hash": (m.calibration or {}).get("hash"), "tag": m.run.tag, "weights_note": m.model.weights_note}


def llmc(model: str, method: str, group: int, inputs: dict) -> dict:
    out = WORK / model / f"llmc-{method}-g{group}"
    job = {"model_dir": str(inputs["folder"]), "tokenizer_dir": str(inputs["folder"]),
           "calib_ids": str(WORK / model / "inputs" / "calib.pt"), "eval_ids": str(WORK / model / "inputs" / "eval.pt"),
           "eval_seqlen": inputs["seqlen"], "recipe": method, "bits": BITS, "group_size": group, "sym": False,
           "out_dir": str(out), "threads": 2}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job, indent=2))
    cmd = [str(VENV / "bin" / "python"), "experiments/peers/llmc_worker.py", str(out / "job.json")]
    if not (out / "result.json").is_file():
        sh(cmd, out.with_suffix(".log"))
    res = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {"status": "error"}
    res.pop("traceback", None)
    return {**res, "command": show(cmd), "job": json.loads(show([json.dumps(job)]).strip("'"))}


def loaded(model: str, method: str, group: int, inputs: dict, s: dict) -> dict:
    """llm-compressor's checkpoint through our loader and evaluation (modules=packed, the reference kernel on CPU)."""
    ckpt = WORK / model / f"llmc-{method}-g{group}" / "checkpoint"
    out = WORK / model / f"ours-loads-llmc-{method}-g{group}"
    note = f"llm-compressor {method} checkpoint (compressed-tensors pack-quantized)" + \
        (f" of a model whose {inputs['note']}" if inputs["note"] else "")
    cmd = ["python", "run.py", f"model={model}", "model.source=compressed_tensors", f"model.path={ckpt}",
           "model.tokenizer=null", f'model.weights_note="{note}"', "method=fp16", "modules=packed", "data.source=local",
           f"eval.max_chunks={s['chunks']}", "logger=none", f"out_dir={out}"]
    if not (out / "metrics.json").is_file():
        sh([sys.executable, *cmd[1:]], out.with_suffix(".log"))
    return _metrics_cell(out, cmd)


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def row_lines(model: str, method: str, group: int, c: dict) -> list[str]:
    """Two table rows (ours, llm-compressor) for one cell."""
    o, l, ld = c["ours"], c["llmc"], c["loaded"]
    g = "per-channel" if group == -1 else f"g{group}"
    mib = lambda b: None if b is None else b / 2**20  # noqa: E731
    if o.get("status") == "skipped":
        lines = [f"| {model} | {method} | w{BITS} {g} | ours | not run here: llm-compressor refuses this group "
                 f"(ours at {g}: results/gptq_awq.md) | - | - | - | - | - |"]
    else:
        lines = [f"| {model} | {method} | w{BITS} {g} | ours | {_f(o.get('ppl'))} | {_f(mib(o.get('weight_bytes')), '{:.3f}')} | "
                 f"{_f(o.get('bits_per_weight'), '{:.3f}')} | {_f(o.get('quantize_seconds'), '{:.1f}')} | - | - |"]
    if l.get("status") != "ok":
        why = (l.get("error") or "failed (see its log)").replace("|", "/")
        lines.append(f"| {model} | {method} | w{BITS} {g} | llm-compressor | {l.get('status')}: {why} | - | - | - | - | - |")
        return lines
    own = l["ppl"]["ppl"]
    rel = None if ld.get("ppl") is None else abs(ld["ppl"] - own) / own
    lines.append(f"| {model} | {method} | w{BITS} {g} | llm-compressor | {_f(ld.get('ppl'))} | "
                 f"{_f(mib(ld.get('weight_bytes')), '{:.3f}')} | {_f(ld.get('bits_per_weight'), '{:.3f}')} | "
                 f"{_f(l['quantize_seconds'], '{:.1f}')} | {own:.4f} | {_f(rel, '{:.1e}')} |")
    return lines


HEADER = """# Our RTN / GPTQ / AWQ vs llm-compressor (issue 16)

wikitext2 test perplexity (GPTQ protocol, first `chunks` chunks of the model's seqlen), {bits}-bit asymmetric weights,
calibration on the same C4 windows for both tools (validation documents 1100..2000, seed {seed}; the windows' hash
is checked equal on both sides). "ours" rows: `python run.py` (fake-quant modules); "llm-compressor" rows: its
`oneshot` in its own virtual environment, its checkpoint then evaluated by **our** loader (model.source=
compressed_tensors, packed modules, the same perplexity code). "llmc own ppl" = llm-compressor's in-memory model
scored by the same qresearch.eval.ppl code on the same chunks; "rel. diff" = |ours-loader - own| / own (the
loader check: float tolerance). MiB = footprint of the whole model (quantized linears as stored, everything else
at 16 bits); llm-compressor stores scales in the model dtype (float32 here) and int32 weight_shape tensors, we store
fp16 scales. "quant s" = wall seconds of the quantization (calibration forwards included; llm-compressor: the
whole `oneshot` call) on a 2-core CPU shared with other jobs: compare within a row pair only.

Sizes: {sizes}.
llm-compressor refuses groups that do not divide a layer's input width (a partial last group), e.g. stories260K's
down_proj (in 172) at g32 and SmolLM2's 576-wide inputs at g128; those rows give its message. Ours ran there on
stories260K only (CPU budget); our SmolLM2 g128 numbers are in results/gptq_awq.md (other calibration sizes).
llm-compressor's AWQ has no clip search (ours searches clipping after scaling); its GPTQ runs its sequential
pipeline (quantized outputs feed the next layer), ours is true-sequential (the default).
llm-compressor 0.14's AWQ pins cached activations in page-locked memory, which fails on a machine without an
accelerator; the worker skips that pinning on CPU (it only speeds up host-to-GPU copies; no value changes).
{notes}
Machine: {machine}. Versions: {versions}.

| model | method | weights | tool | ppl | MiB | bits/weight | quant s | llmc own ppl | rel. diff |
|---|---|---|---|---|---|---|---|---|---|
"""


def render(cells: dict, inputs: dict) -> str:
    import platform

    sizes = "; ".join(f"{m}: eval {s['chunks']} chunks, calibration {s['n_samples']} x {s['calib_seqlen']} tokens"
                      for m, s in MODELS.items() if m in inputs)
    notes = "".join(f"{m}: {i['note']} (the llm-compressor checkpoint was made from the same dequantized weights).\n"
                    for m, i in inputs.items() if i["note"])
    vers = next((c["llmc"]["versions"] for c in cells.values() if c["llmc"].get("versions")), {})
    import torch
    import transformers

    versions = (f"ours: torch {torch.__version__}, transformers {transformers.__version__}; llm-compressor side: "
                + ", ".join(f"{k} {v}" for k, v in vers.items()))
    text = HEADER.format(bits=BITS, seed=SEED, sizes=sizes, notes=notes, versions=versions,
                         machine=f"{platform.machine()} CPU, {os.cpu_count()} cores, load average at start "
                                 f"{os.getloadavg()[0]:.1f}, one run per cell")
    seen = set()
    for (model, method, group), c in cells.items():
        fp = c["ours"].get("fp_ppl")
        if model not in seen and fp is not None:
            text += f"| {model} | fp (baseline) | - | - | {fp:.2f} | - | 16 | - | - | - |\n"
            seen.add(model)
        text += "\n".join(row_lines(model, method, group, c)) + "\n"
    text += "\n## Commands\n\n```\n" + "\n".join(
        f"{c[k]['command']}" for c in cells.values() for k in ("ours", "llmc", "loaded") if c[k].get("command")) + "\n```\n"
    text += "\nllm-compressor jobs (experiments/peers/llmc_worker.py <job.json>):\n\n```\n" + "\n".join(
        json.dumps(c["llmc"]["job"]) for c in cells.values() if c["llmc"].get("job")) + "\n```\n"
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    a = ap.parse_args(argv)
    if sh(["bash", "experiments/peers/setup_venv.sh", str(VENV)], WORK / "setup_venv.log"):
        raise SystemExit(f"building the llm-compressor venv failed; see {WORK / 'setup_venv.log'}")
    cells, inputs = {}, {}
    for model in a.models:
        s = MODELS[model]
        inputs[model] = model_inputs(model, s)
        for group in s["groups"]:
            for method in a.methods:
                c = {"llmc": llmc(model, method, group, inputs[model])}
                ok = c["llmc"].get("status") == "ok"
                c["ours"] = ours(model, method, group, s) if ok or s["ours_if_refused"] else {"status": "skipped"}
                c["loaded"] = loaded(model, method, group, inputs[model], s) if ok else {}
                if c["ours"].get("calib_hash") not in (None, inputs[model]["calib_hash"]):
                    raise SystemExit(f"{model}: our run's calibration windows differ from the ones given to llm-compressor")
                cells[(model, method, group)] = c
                print(model, method, group, {k: v.get("ppl") for k, v in c.items()}, flush=True)
    (REPO / "results" / "peers.md").write_text(render(cells, inputs))
    (REPO / "results" / "peers.json").write_text(json.dumps(
        [{"model": m, "method": me, "group": g, **c} for (m, me, g), c in cells.items()], indent=2, default=str))
    print("written: results/peers.md, results/peers.json")


if __name__ == "__main__":
    main()
