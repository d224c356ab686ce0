"""Evaluation overhead: batched perplexity equals batch 1, the per-chunk loss equals the flattened one, and a
fake-quantized model's forward does no dequantization (its weights were dequantized once, at swap time)."""
import math

import torch
import torch.nn.functional as F

import qresearch.quant.primitives as primitives
from methods.rtn import RTN
from qresearch.eval.ppl import chunk_ids, chunk_nll, perplexity
from qresearch.method import Context
from qresearch.models.arch import arch_for
from qresearch.nn.fake import FakeQuantLinear
from qresearch.nn.swap import swap_linears
from tests.pipeline_helpers import stories260k, tiny_model


def test_batched_perplexity_equals_batch_one():
    model = stories260k()
    ids = torch.randint(3, 512, (1, 64 * 20), generator=torch.Generator().manual_seed(0))
    one = perplexity(model, ids, 64, "cpu", batch_size=1)
    sixteen = perplexity(model, ids, 64, "cpu", batch_size=16)  # a partial last batch of 4 too
    assert one["n_predicted"] == sixteen["n_predicted"] == 20 * 63
    assert math.isclose(one["ppl"], sixteen["ppl"], rel_tol=1e-6)


def test_per_chunk_loss_equals_flattened_loss():
    model = tiny_model("llama")
    x = chunk_ids(torch.randint(0, 128, (1, 32 * 6), generator=torch.Generator().manual_seed(1)), 32)  # [6, 32]
    with torch.no_grad():
        logits = model(input_ids=x).logits
    flat = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    assert torch.equal(chunk_nll(model, x, "cpu", batch_size=6), flat.view(6, -1).double().sum(1))


def test_fake_forward_does_no_dequantization(monkeypatch):
    model = tiny_model("llama")
    res = RTN(bits=4, group_size=32).quantize(model, Context(calib=None, arch=arch_for(model),
                                                             device=torch.device("cpu")))
    swap_linears(model, res, "fake")
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, FakeQuantLinear)
    x = torch.randn(2, 5, lin.in_features)

    def forbidden(*a, **k):
        raise AssertionError("dequantize called during a forward")

    monkeypatch.setattr(primitives, "dequantize", forbidden)
    monkeypatch.setattr(primitives.QTensor, "dequantize", forbidden)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 128, (1, 8)))
        y = lin(x)
    assert torch.equal(y, F.linear(x, lin.weight))
    assert lin.weight.is_contiguous() and lin.weight.dtype == torch.float32
