"""Fault injection: a sweep killed mid-run (SIGTERM, then SIGKILL), then a damaged index line, metrics.json,
token cache and FP-baseline cache; the next sweep completes, reruns exactly what is missing, and gives the same
numbers as the runs before the damage."""
import json
import os
import signal
import subprocess
import sys
import time

from qresearch.tracking.store import read_index

from .conftest import DATA, REPO, require_shared

SWEEP = ["-m", "model=stories260k", f"data.root={DATA}", "eval.max_chunks=3", "logger=none", "method=rtn",
         "method.rtn._target_=tests.blocking_method.BlockingRTN"]


def _start(bits: str, tmp_path, block: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QRESEARCH_CACHE": str(tmp_path / "cache"),
           "QRTEST_MARKER": str(tmp_path / f"blocked-{block}")}
    env.pop("QRTEST_BLOCK_BITS", None)
    if block:
        env["QRTEST_BLOCK_BITS"] = block
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *SWEEP, f"bits={bits}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when_blocked(p: subprocess.Popen, marker, sig) -> tuple[int, str, str]:
    deadline = time.time() + 240
    while not marker.exists():
        assert p.poll() is None and time.time() < deadline, p.communicate()[1][-3000:]
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def _runs(results_dir) -> dict:
    """{tag: metrics} of complete runs, newest per tag."""
    out = {}
    for f in sorted((results_dir / "runs").rglob("metrics.json")):
        try:
            m = json.loads(f.read_text())
        except ValueError:
            continue
        out[m["run"]["tag"]] = m
    return out


def test_killed_sweeps_and_damaged_files_then_resume(results_dir, tmp_path):
    require_shared()
    # 1. SIGTERM while rtn-w4 is quantizing: failure.json there, summary printed, status 143
    rc, out, err = _kill_when_blocked(_start("3,4", tmp_path, "4"), tmp_path / "blocked-4", signal.SIGTERM)
    assert rc == 143, err[-3000:]
    assert "terminated by SIGTERM" in err and "== sweep: 2 jobs: 1 done, 0 skipped, 1 failed" in out
    (fail,) = (results_dir / "runs").rglob("failure.json")
    assert "Terminated" in json.loads(fail.read_text())["error"] and not (fail.parent / "metrics.json").exists()
    # 2. SIGKILL while rtn-w8 is quantizing: nothing can be written; w3 was skipped, w4 completed before
    rc, out, _ = _kill_when_blocked(_start("3,4,8", tmp_path, "8"), tmp_path / "blocked-8", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    before = _runs(results_dir)
    assert sorted(before) == ["rtn-w3g128", "rtn-w4g128"]
    # 3. damage: a cut index line, a garbage metrics.json (w3), a truncated token cache, an edited baseline
    index = results_dir / "runs" / "index.jsonl"
    with open(index, "a") as f:
        f.write('{"run_dir": "/gone", "config_hash": "abc", "bi')
    w3_metrics = next(p for p in (results_dir / "runs").rglob("metrics.json") if "rtn-w3g128" in str(p))
    w3_metrics.write_text("{garbage")
    (tok_cache,) = (tmp_path / "cache" / "tokens").glob("*.safetensors")
    tok_cache.write_bytes(tok_cache.read_bytes()[:5000])
    (base,) = (tmp_path / "cache" / "baselines").glob("*.json")
    entry = json.loads(base.read_text())
    entry["result"]["ppl"] = 1.0  # "a quantized model better than FP"
    base.write_text(json.dumps(entry))
    # 4. the next sweep completes: w3 rerun (its metrics were lost), w4 skipped, w8 run (it was killed)
    p = _start("3,4,8", tmp_path, None)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    log = out + err
    assert "== sweep: 3 jobs: 2 done, 1 skipped, 0 failed" in out
    for damaged in (index, w3_metrics, tok_cache, base):
        assert str(damaged) in log, damaged
    after = _runs(results_dir)
    assert sorted(after) == ["rtn-w3g128", "rtn-w4g128", "rtn-w8g128"]
    fp = before["rtn-w4g128"]["ppl"]["wikitext2"]
    for tag in ("rtn-w3g128", "rtn-w4g128"):
        assert after[tag]["ppl"]["wikitext2"] == before[tag]["ppl"]["wikitext2"], tag  # same numbers, bit for bit
    w8 = after["rtn-w8g128"]["ppl"]["wikitext2"]
    assert w8["fp_ppl"] == fp["fp_ppl"] and w8["n_tokens"] == fp["n_tokens"] == 3 * 256
    assert w8["delta_ppl"] == w8["ppl"] - w8["fp_ppl"] and abs(w8["delta_ppl"]) < 1.0  # w8 is close to FP
    assert sorted(r["tag"] for r in read_index(index)) == ["rtn-w3g128", "rtn-w3g128", "rtn-w4g128", "rtn-w8g128"]
    # 5. the report reads the same damaged results root without --results (QRESEARCH_RESULTS)
    r = subprocess.run([sys.executable, "-m", "qresearch.report"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    md = (results_dir / "report.md").read_text()
    assert all(f"| rtn | {t} |" in md for t in after) and "ppl_vs_latency: not drawn" in r.stdout
