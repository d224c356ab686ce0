"""The fast GPTQ solve and pipeline give bit-identical results: frozen codes/qparams hashes on fixed inputs, the
plain column loop on many configurations, the int fast path against the format path, a Hessian prepared once for
several weights, and true-sequential calibration with and without replayed submodule outputs."""
import contextlib
import hashlib
import random

import pytest
import torch

import methods.gptq as gptq_module
import methods.gptq_solver as solver
from methods.gptq import GPTQ, gptq_quantize, prepare_hessian
from qresearch.calib.replay import Replay
from qresearch.method import Context
from qresearch.models.arch import arch_for, blocks_of
from qresearch.quant import QuantSpec, quantize_tensor, weight_spec
from tests.gptq_plain_loop import plain_gptq
from tests.pipeline_helpers import tiny_model


@pytest.fixture
def one_thread():
    """MKL's Cholesky depends on the thread count (1 vs 2 threads give different last bits): pin it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exact_inputs(out_f=24, in_f=200, n=256, seed=0):
    """W with k/64 entries and H = 2/n X^T X from small integers: both exact in float32 on any platform."""
    r = random.Random(seed)
    big = [4 if r.random() < 0.06 else 1 for _ in range(in_f)]
    base = [[r.randint(-8, 8) for _ in range(in_f)] for _ in range(n)]
    X = torch.tensor([[(row[j] + (row[j - 1] if j else 0)) * big[j] for j in range(in_f)] for row in base],
                     dtype=torch.float32)  # neighbouring channels correlated, a few large ones
    W = torch.tensor([[r.randint(-64, 64) / 64 for _ in range(in_f)] for _ in range(out_f)], dtype=torch.float32)
    return W, X.T @ X * (2.0 / n)


def digest(q) -> str:
    h = hashlib.sha256()
    for t in (q.codes, q.scale, q.zero) + ((q.g_idx,) if q.g_idx is not None else ()):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Produced by the solver before it was arranged for speed (commit 50c15d9, torch 2.13 CPU / MKL, 1 thread).
FROZEN = {
    "g64-asym": (dict(spec=weight_spec(4, 64, False), blocksize=64), "d7a5399dc8b5b198"),
    "g64-asym-ao": (dict(spec=weight_spec(4, 64, False), blocksize=64, act_order=True), "fc556587f62b8db9"),
    "g64-asym-ao-sg": (dict(spec=weight_spec(4, 64, False), blocksize=64, act_order=True, static_groups=True),
                       "1e36f1794a017c62"),
    "g48-b32-sym3": (dict(spec=weight_spec(3, 48, True), blocksize=32), "eb3db5630a93ee55"),
    "g48-b32-ao": (dict(spec=weight_spec(3, 48, False), blocksize=32, act_order=True), "a9885bdde55938fc"),
    "g-1-b128": (dict(spec=weight_spec(4, -1, False), blocksize=128), "3197482ca74b8fd3"),
    "fp8-g64-ao": (dict(spec=QuantSpec(bits=8, group_size=64, qformat="fp8_e4m3"), blocksize=64, act_order=True),
                   "a72ec1407f39c5f9"),
    "prior-ao0": (dict(spec=weight_spec(3, 64, False), blocksize=64, act_order=False), "ffe8109451784350"),
    "prior-ao1": (dict(spec=weight_spec(3, 64, False), blocksize=64, act_order=True), "77245f082b4e6ce4"),
}


@pytest.mark.parametrize("case", list(FROZEN))
def test_frozen_codes_and_qparams(case, one_thread):
    W, H = exact_inputs()
    kw, expected = FROZEN[case]
    if case.startswith("prior"):  # stacking: fixed qparams from an earlier step (a clipped grid)
        grid = quantize_tensor(0.8 * W, weight_spec(3, 64, False))
        kw = dict(kw, qparams=(grid.scale, grid.zero))
    q, loss = gptq_quantize(W, H, **kw)
    assert digest(q) == expected and loss > 0


CONFIGS = [  # (out, in, spec, blocksize, act_order, static_groups, prior grid)
    (16, 200, weight_spec(4, 64, False), 64, False, False, False),
    (16, 200, weight_spec(4, 64, False), 7, True, False, False),
    (16, 200, weight_spec(3, 48, True), 32, True, True, False),
    (16, 200, weight_spec(2, 40, False), 128, False, False, False),  # groups cross block ends
    (16, 96, weight_spec(4, -1, True), 32, True, False, False),
    (8, 130, weight_spec(8, 32, False), 50, True, False, False),
    (16, 200, weight_spec(3, 64, False), 64, True, False, True),
    (16, 128, QuantSpec(bits=8, group_size=32, qformat="fp8_e4m3"), 48, True, False, False),
    (16, 128, QuantSpec(bits=8, group_size=-1, granularity="channel", qformat="fp8_e5m2"), 32, False, False, False),
]


def _solve_both(cfg, H=None):
    out_f, in_f, spec, bs, ao, sg, prior = cfg
    g = torch.Generator().manual_seed(in_f + out_f)
    W = torch.randn(out_f, in_f, generator=g)
    if H is None:
        x = torch.randn(512, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
        x[:, 3] = 0  # a dead input channel
        H = 2 * x.T @ x / 512
    qp = None
    if prior:
        grid = quantize_tensor(0.8 * W, spec)
        qp = (grid.scale, grid.zero)
    fast, loss = gptq_quantize(W, H, spec, bs, 0.01, ao, sg, qp)
    plain, plain_loss = plain_gptq(W, H, spec, bs, 0.01, ao, sg, qp)
    assert loss == pytest.approx(plain_loss, rel=1e-5)  # summed in another order: close, not bit-equal
    return fast, plain


def _same(a, b) -> bool:
    return (torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
            and (a.g_idx is None) == (b.g_idx is None) and (a.g_idx is None or torch.equal(a.g_idx, b.g_idx)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}x{c[1]}-{c[2].tag}-b{c[3]}-ao{int(c[4])}"
                                                        f"-sg{int(c[5])}-prior{int(c[6])}")
def test_fast_solver_matches_plain_loop(cfg):
    fast, plain = _solve_both(cfg)
    assert _same(fast, plain)


def test_int_fast_path_matches_format_path(monkeypatch):
    """The numpy int loop and the format's encode/decode loop (other formats, GPUs) round identically."""
    cfg = CONFIGS[2]
    fast, _ = _solve_both(cfg)
    monkeypatch.setattr(solver, "IntFormat", type("NotInt", (), {}))  # no format is the int fast path now
    generic, plain = _solve_both(cfg)
    assert _same(fast, generic) and _same(generic, plain)


def test_prepared_hessian_is_shared_and_checked():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    H, spec = 2 * x.T @ x / 256, weight_spec(4, 32, False)
    prep = prepare_hessian(H, 0.01, act_order=True)
    for out_f in (16, 8, 8):  # q, k, v: one prepared Hessian
        W = torch.randn(out_f, 64, generator=g)
        assert _same(gptq_quantize(W, prep, spec, 32, 0.01, True)[0], gptq_quantize(W, H, spec, 32, 0.01, True)[0])
    with pytest.raises(ValueError, match="prepared Hessian"):
        gptq_quantize(W, prep, spec, 32, 0.05, True)


@contextlib.contextmanager
def _no_replay(self, record=True):
    yield


@pytest.mark.parametrize("kind,act_order", [("llama", False), ("llama", True), ("opt", False)])
def test_replay_leaves_results_identical(kind, act_order, monkeypatch):
    """True-sequential GPTQ with replayed outputs of final submodules and the block outputs handed to the engine =
    recomputing everything, the engine running the output forward itself (2 blocks: the second block's inputs
    are the first one's quantized outputs)."""
    def run():
        model = tiny_model(kind)
        ctx = Context(calib=torch.randint(0, 120, (6, 32), generator=torch.Generator().manual_seed(1)),
                      arch=arch_for(model), device=torch.device("cpu"))
        return GPTQ(bits=3, group_size=32, act_order=act_order, batch_size=4).quantize(model, ctx)

    fast = run()
    assert fast.info["replay_peak_bytes"] > 0
    monkeypatch.setattr(Replay, "active", _no_replay)
    monkeypatch.setattr(gptq_module, "BlockResult", lambda weights, outputs: weights)  # the engine's own forward
    slow = run()
    assert fast.layers.keys() == slow.layers.keys()
    for name, res in fast.layers.items():
        assert _same(res.weight, slow.layers[name].weight), name
        assert res.stats["out_rel_err"] == slow.layers[name].stats["out_rel_err"], name


def test_replay_plan_follows_the_groups():
    """llama: q/k/v recorded once final, then replayed inside self_attn while it is recorded, then self_attn
    replayed; the last forward records nothing."""
    model = tiny_model("llama")
    block = blocks_of(model, arch_for(model))[0]
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    rp = Replay(block, [n for g in groups for n in g], n_batches=2)
    assert rp._plan(True) == ([], [])
    rp.finalize(groups[0])
    assert rp._plan(True) == ([], ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"])
    rp.cache = {n: [] for n in groups[0]}
    rp.finalize(groups[1])
    assert rp._plan(True) == (["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn"])
    rp.cache = {"self_attn": []}
    rp.finalize(groups[2])
    assert rp._plan(True) == (["self_attn"], ["mlp.gate_proj", "mlp.up_proj"])
    rp.finalize(groups[3])
    assert rp._plan(False) == (["self_attn"], [])
