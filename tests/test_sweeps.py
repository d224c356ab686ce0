"""Issue 3: resumable multirun, crash records, launchers (joblib, submitit local), reports, lm-eval, wandb files."""
import json

from qresearch.tracking.store import read_index

from .conftest import DATA, require_shared
from .helpers import run_cli, run_dirs
from .wandb_reader import read_run

TINY = ["model=tiny_random_llama", f"data.root={DATA}", "eval.max_chunks=2", "logger=none"]


def _index(results_dir):
    return read_index(results_dir / "runs" / "index.jsonl")


def test_resume_skips_finished_runs(results_dir):
    require_shared()
    first = run_cli(*TINY, "method=rtn", "bits=4")
    assert first.returncode == 0, first.stderr[-2000:]
    sweep = run_cli("-m", *TINY, "method=rtn", "bits=3,4")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert sweep.stdout.count("== skipped (skip_done=true)") == 1 and "rtn-w4g128" in sweep.stdout
    assert sorted(r["bits"] for r in _index(results_dir)) == [3, 4]
    forced = run_cli(*TINY, "method=rtn", "bits=4", "skip_done=false")
    assert forced.returncode == 0 and "skipped" not in forced.stdout
    assert len(_index(results_dir)) == 3


def test_crashed_run_leaves_failure_record_and_sweep_continues(results_dir):
    require_shared()
    r = run_cli("-m", *TINY, "method.rtn._target_=methods.rtn.RTN,tests.crash_method.Crash")
    assert r.returncode == 1, r.stderr[-2000:]  # a sweep with a failed run says so in its exit status
    assert "deliberate crash" in r.stderr and "== sweep: 2 jobs: 1 done, 0 skipped, 1 failed" in r.stdout
    failures = list((results_dir / "runs").rglob("failure.json"))
    assert len(failures) == 1 and not (failures[0].parent / "metrics.json").exists()
    assert "RuntimeError: deliberate crash" in json.loads(failures[0].read_text())["error"]
    assert len(run_dirs(results_dir)) == 1 and len(_index(results_dir)) == 1


def test_submitit_local_launcher(results_dir):
    require_shared()
    r = run_cli("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *TINY, "method=fp16,rtn")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(m["method"] for m in _index(results_dir)) == ["fp16", "rtn"]


def test_joblib_launcher(results_dir):
    require_shared()
    r = run_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "method=rtn", "bits=3,4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "== sweep: 2 jobs: 2 done, 0 skipped, 0 failed" in r.stdout  # outcomes recorded by worker processes
    assert sorted(m["bits"] for m in _index(results_dir)) == [3, 4]


def test_report_table_and_plots(results_dir, tmp_path):
    require_shared()
    r = run_cli("-m", *TINY, "method=fp16,rtn", "bits=3,4", "eval.baseline=true")
    assert r.returncode == 0, r.stderr[-3000:]
    from qresearch.report import build

    out = build(results_dir, tmp_path / "rep" / "report")
    md = out["markdown"].read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert table[1].startswith("| fp16 |"), table  # FP row first (after the header)
    assert sum(ln.startswith("| fp16 |") for ln in table) == 1  # bits do not reach fp16: one config, run once
    assert sum(ln.startswith("| rtn |") for ln in table) == 2
    assert r.stdout.count("== skipped (skip_done=true)") == 1
    assert "Provenance" in md and "wikitext2/test gptq_chunks seqlen 128" in md
    png = out["ppl_vs_bits"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_eval_piqa_local_on_quantized_model(results_dir):
    require_shared()
    r = run_cli("model=stories260k", "method=rtn", "bits=4", f"data.root={DATA}", "eval.datasets=[]",
                "eval.lm_eval.tasks=[piqa_local]", "eval.lm_eval.limit=100", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dirs(results_dir)[0] / "metrics.json").read_text())
    t = m["lm_eval"]["tasks"]["piqa_local"]
    assert t["n_samples"] == 100 and 0.0 <= t["acc"] <= 1.0 and 0 < t["acc_stderr"] < 0.1
    assert m["lm_eval"]["protocol"]["in_memory_model"] and m["lm_eval"]["protocol"]["lm_eval_version"]
    assert _index(results_dir)[0]["piqa_local_acc"] == t["acc"]


def test_wandb_offline_config_summary_and_table(results_dir):
    require_shared()
    r = run_cli("model=stories260k", "method=rtn", "bits=3", f"data.root={DATA}", "eval.max_chunks=2",
                "logger=wandb", "logger.mode=offline")
    assert r.returncode == 0, r.stderr[-3000:]
    (f,) = (results_dir / "wandb").glob("offline-run-*/*.wandb")
    run = read_run(f)
    assert run["run"]["group"] == "stories260k" and run["run"]["tags"] == ["rtn", "w3", "a16", "fake"]
    assert json.loads(run["config"]["bits"]) == 3 and "method.rtn.bits" in run["config"]
    for key in ("ppl.wikitext2.ppl", "ppl.wikitext2.delta_ppl", "footprint.bits_per_weight", "timing.quantize_seconds",
                "memory.peak_rss_bytes"):
        assert key in run["summary"], key
    assert "layers.nrows" in run["summary"] and json.loads(run["summary"]["layers.nrows"]) == 5 * 7


def test_sweep_of_refused_runs_exits_nonzero_with_summary(results_dir):
    """The issue's example: every job refused -> summary names each with its error, status 1, nothing written."""
    r = run_cli("-m", "model=stories260k", "method=rtn", "bits=0,1", "logger=none")
    assert r.returncode == 1, r.stderr[-2000:]
    assert "== sweep: 2 jobs: 0 done, 0 skipped, 2 failed" in r.stdout
    assert "bits=0 is out of range" in r.stdout and "bits=1 is out of range" in r.stdout
    assert not run_dirs(results_dir) and not list((results_dir / "runs").rglob("failure.json"))


def test_collapse_seeds_means_and_sds_runs_of_one_setting():
    from qresearch.report import collapse_seeds

    base = {"method": "gptq", "tag": "gptq-w4g128", "setting": "s1", "quantize_seconds": 2.0}
    rows = [{**base, "config_hash": "a", "seed": 1, "time": "t2", "ppl_wikitext2": 12.0, "piqa_acc": 0.6,
             "piqa_acc_stderr": 0.01, "latency_decode_1_ms_per_step": 5.0},
            {**base, "config_hash": "b", "seed": 0, "time": "t1", "ppl_wikitext2": 10.0, "piqa_acc": 0.5,
             "piqa_acc_stderr": 0.01},
            {**base, "config_hash": "c", "seed": 0, "time": "t0", "ppl_wikitext2": 20.0, "setting": "s2"}]
    by = {r["setting"]: r for r in collapse_seeds(rows)}
    two, one = by["s1"], by["s2"]
    assert two["seeds"] == [0, 1] and two["config_hash"] == "a"  # newest run's identity
    assert two["ppl_wikitext2"] == 11.0 and abs(two["ppl_wikitext2_sd"] - 2 ** 0.5) < 1e-12
    assert abs(two["piqa_acc"] - 0.55) < 1e-12 and "piqa_acc_stderr" not in two
    assert "latency_decode_1_ms_per_step" not in two  # measured in one of the two runs only
    assert one["seeds"] == [0] and one["ppl_wikitext2"] == 20.0 and "ppl_wikitext2_sd" not in one


def test_report_gives_one_row_per_setting_over_seeds(results_dir, tmp_path):
    require_shared()
    r = run_cli("-m", *TINY, "method=gptq", "bits=3", "data.n_samples=4", "seed=0,1")
    assert r.returncode == 0, r.stderr[-3000:]
    from qresearch.report import build

    md = build(results_dir, tmp_path / "report")["markdown"].read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| gptq |")]
    assert len(rows) == 1 and "| 0,1 |" in rows[0] and " ± " in rows[0], md
    ppls = [json.loads((d / "metrics.json").read_text())["ppl"]["wikitext2"]["ppl"] for d in run_dirs(results_dir)]
    assert len(ppls) == 2 and f"{sum(ppls) / 2:.2f} ± " in rows[0], (ppls, rows)


def test_report_wandb_failure_is_one_line_after_the_local_report(tmp_path, monkeypatch, capsys):
    """wandb refusing (no API key, no network) ends the report command with one line naming the way out; the local
    files, written first, are listed above it."""
    import pytest

    from qresearch import report

    md = tmp_path / "report.md"
    monkeypatch.setattr(report, "build", lambda *a, **k: {"markdown": md})

    def no_key(*a, **k):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.\nmore detail")

    monkeypatch.setattr(report, "log_to_wandb", no_key)
    with pytest.raises(SystemExit) as e:
        report.main(["--results", str(tmp_path), "--wandb", "online"])
    msg = str(e.value)
    assert msg.startswith("error: the report is written above") and "RuntimeError: No API key" in msg
    assert "--wandb offline" in msg and "\n" not in msg
    assert f"markdown: {md}" in capsys.readouterr().out
