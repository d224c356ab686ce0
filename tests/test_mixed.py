"""Mixed precision: the allocation math against brute force, budget rules, and a run end to end (sensitivity step ->
bits map artifact -> rtn with bits_map=prior; the saved map reloads)."""
import itertools
import json
import random

import pytest

from qresearch.config import plan
from qresearch.errors import ConfigError
from qresearch.quant.allocate import allocate_greedy, allocate_random, bits_per_weight, lower_hull
from qresearch.runner import run

from .conftest import DATA, require_shared
from .helpers import compose_cfg


def _instance(n_layers=5, widths=(2, 3, 4, 6), seed=0):
    """Equal-size layers, costs linear in bits, convex errors a * 4^-b: greedy is exactly optimal here."""
    rng = random.Random(seed)
    n = {f"l{i}": 100 for i in range(n_layers)}
    costs = {k: {b: 100.0 * b for b in widths} for k in n}
    errors = {k: {b: rng.uniform(0.1, 10) * 4.0 ** -b for b in widths} for k in n}
    return errors, costs, n


@pytest.mark.parametrize("budget", [2.0, 2.6, 3.0, 3.4, 4.2, 6.0])
def test_greedy_matches_brute_force(budget):
    errors, costs, n = _instance(widths=(2, 3, 4, 5, 6))
    alloc = allocate_greedy(errors, costs, n, budget)
    assert bits_per_weight(alloc, costs, n) <= budget + 1e-9
    best = min(sum(errors[k][b] for k, b in zip(n, combo)) for combo in itertools.product(*[costs[k] for k in n])
               if sum(costs[k][b] for k, b in zip(n, combo)) <= budget * sum(n.values()) + 1e-9)
    assert sum(errors[k][b] for k, b in alloc.items()) == pytest.approx(best)


def test_greedy_beats_random_and_follows_sensitivity():
    errors, costs, n = _instance(n_layers=8, widths=(2, 3, 4, 8), seed=1)
    errors["l0"] = {b: 1e3 * e for b, e in errors["l0"].items()}  # one very sensitive layer
    g = allocate_greedy(errors, costs, n, 3.5)
    total = lambda a: sum(errors[k][b] for k, b in a.items())  # noqa: E731
    for seed in range(5):
        r = allocate_random(costs, n, 3.5, seed)
        assert bits_per_weight(r, costs, n) <= 3.5 + 1e-9 and total(g) <= total(r)
    assert g["l0"] == max(g.values())


def test_hull_drops_dominated_and_concave_points():
    pts = [(2, 10.0, 2), (3, 4.0, 3), (4, 3.9, 4), (5, 1.0, 5), (6, 1.5, 6)]
    assert [p[2] for p in lower_hull(pts)] == [2, 3, 5]


def test_budget_below_the_cheapest_allocation_is_refused():
    errors, costs, n = _instance()
    with pytest.raises(ConfigError, match="budget=1.5"):
        allocate_greedy(errors, costs, n, 1.5)


@pytest.mark.parametrize("over,msg", [(["method.mixed.candidates=[3]"], "need >= 2 widths"),
                                      (["method.mixed.candidates=[2,9]"], r"candidates=\[2, 9\]"),
                                      (["method.mixed.proxy=fisher"], "proxy='fisher'"),
                                      (["method.mixed.budget=0"], "budget=0")])
def test_bad_mixed_options_are_one_line_errors(over, msg):
    with pytest.raises(ConfigError, match=msg):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=mixed_rtn", *over]))


def test_bits_map_file_is_checked_up_front(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"model.layers.0.mlp.up_proj": 9}))
    with pytest.raises(ConfigError, match=r"bits \[9\] do not fit qformat=int"):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=gptq", f"bits_map={f}"]))
    with pytest.raises(ConfigError, match="does not exist"):
        plan(compose_cfg(["model=stories260k", f"data.root={DATA}", "method=rtn", f"bits_map={tmp_path / 'no'}"]))


def _run(tmp_path, name, over):
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", "logger=none", "eval.max_chunks=4",
                       "data.n_samples=4", "data.seqlen=64", "skip_done=false", *over])
    cfg.paths.results = str(tmp_path / "results")
    cfg.out_dir = str(tmp_path / name)
    return run(cfg)


def test_mixed_run_allocates_saves_and_reloads(tmp_path):
    require_shared()
    m = _run(tmp_path, "mixed", ["method=mixed_rtn", "method.mixed.budget=3.5", "method.mixed.candidates=[2,3,4,8]"])
    alloc_step, rtn_step = m["run"]["steps"]
    alloc = alloc_step["bits_map"]
    assert len(alloc) == 35 and set(alloc.values()) <= {2, 3, 4, 8} and len(set(alloc.values())) > 1
    assert m["footprint"]["bits_per_weight"] == pytest.approx(alloc_step["bits_per_weight"])
    assert 3.0 < m["footprint"]["bits_per_weight"] <= 3.5
    assert rtn_step["bits_map"]["source"] == "prior" and rtn_step["bits_map"]["layers"] == 35
    errs = alloc_step["total_error"]
    assert errs["allocated"] < errs["uniform_w3"]
    again = _run(tmp_path, "reload", ["method=rtn", f"bits_map={tmp_path / 'mixed' / 'artifacts.safetensors'}"])
    assert again["footprint"]["bits_per_weight"] == pytest.approx(m["footprint"]["bits_per_weight"])
    assert again["ppl"]["wikitext2"]["ppl"] == pytest.approx(m["ppl"]["wikitext2"]["ppl"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model.layers.0.nope": 3}))
    with pytest.raises(ConfigError, match="names layers the model does not have"):
        _run(tmp_path, "bad", ["method=rtn", f"bits_map={bad}"])
