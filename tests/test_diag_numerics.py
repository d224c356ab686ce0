"""experiments/diag_gptq_numerics.py: its pure parts (permutations, statistics, report) on synthetic runs."""
import torch

from experiments.diag_gptq_numerics import mean_sd, permuted, report, welch_t


def test_permutations_keep_the_windows_and_perm_0_is_as_drawn():
    calib = torch.arange(24).reshape(6, 4)
    assert permuted(calib, 0) is calib
    p = permuted(calib, 3)
    assert torch.equal(p, permuted(calib, 3)) and not torch.equal(p, calib)
    assert sorted(map(tuple, p.tolist())) == sorted(map(tuple, calib.tolist()))


def test_statistics():
    assert mean_sd([1.0, 3.0]) == (2.0, 2 ** 0.5) and mean_sd([5.0]) == (5.0, 0.0)
    assert abs(welch_t([2.0, 4.0], [1.0, 3.0]) - 1 / (2 ** 0.5)) < 1e-9


def test_report_lists_runs_per_batch_with_spread_and_forward_check():
    meta = {"machine": {"cpu": "cpu", "cores": 2, "torch": "2", "threads": 1, "commit": "abc"},
            "calibration": {"dataset": "c4", "n_samples": 8, "seqlen": 64, "seed": 0, "hash": "h"},
            "eval": {"dataset": "wikitext2 test", "chunks": 2, "seqlen": 64}}
    b8 = {**meta, "rows": [{"batch": 8, "perm": p, "ppl": v, "seconds": 1.0} for p, v in ((0, 10.0), (1, 12.0))]}
    b1 = {**meta, "rows": [{"batch": 1, "perm": p, "ppl": v, "seconds": 1.0} for p, v in ((0, 11.0), (1, 11.0))]}
    hs = [{"block": 0, "linear": "q", "batch8_rel_err": 2e-7, "batch1_rel_err": 4e-7}]
    md = report([b8, b1, {"forward_check": {"windows": 16, "blocks": 30, "threads": 1, "max_abs_diff": 0.0,
                                            "hessians": hs}}])
    assert "| 0 | 11.000 | 10.000 |" in md and "| 1 | 11.000 | 12.000 |" in md
    assert "batch 8: mean 11.000, sd 1.414" in md and "Welch t (batch 1 - batch 8): 0.00" in md
    assert "max |difference| 0.0e+00" in md and "batch 8 2.0e-07..2.0e-07" in md
