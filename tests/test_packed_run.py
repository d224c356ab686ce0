"""A packed run through run.py: kernels per layer, measured bytes, latency in metrics; ppl equals the fake run."""
import json

from .conftest import DATA, require_shared
from .helpers import run_cli, run_dirs


def test_packed_run_records_kernels_bytes_latency_and_matches_fake(results_dir):
    require_shared()
    common = ["model=stories260k", "method=rtn", "bits=4", f"data.root={DATA}", "logger=none",
              "eval.max_chunks=4", "eval.baseline=false", "skip_done=false"]
    lat = ["eval.latency.enabled=true", "eval.latency.prompt_lengths=[16,4096]", "eval.latency.batch_sizes=[1,2]",
           "eval.latency.decode_tokens=4", "eval.latency.repeats=2", "eval.latency.warmup=1"]
    for fmt, extra in (("fake", []), ("packed", lat)):
        r = run_cli(*common, f"modules={fmt}", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    runs = {m["run"]["modules"]: m for m in (json.loads((d / "metrics.json").read_text())
                                            for d in run_dirs(results_dir))}
    fake, packed = runs["fake"], runs["packed"]
    assert packed["kernels"] == {"c_lowbit_w4a16": 35} and fake["kernels"] == {"fake": 35}
    assert set(packed["kernels_by_layer"].values()) == {"c_lowbit_w4a16"}
    # fp16 scales (packed) vs fp32 scales (fake): equal to float tolerance, not bit-exact
    p_fake, p_packed = fake["ppl"]["wikitext2"]["ppl"], packed["ppl"]["wikitext2"]["ppl"]
    assert abs(p_packed - p_fake) / p_fake < 1e-3, (p_fake, p_packed)
    fp = packed["footprint"]
    arithmetic = fp["bits_per_weight"] * fp["quantized_params"] / 8
    assert arithmetic <= fp["measured_packed_bytes"] < 1.03 * arithmetic
    lat_m = packed["latency"]
    assert set(lat_m["prefill"]) == {"16", "512"} and set(lat_m["decode"]) == {"1", "2"}  # 4096 capped at 512
    assert fake["latency"] is None
