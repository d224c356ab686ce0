"""Perplexity protocols against a float64 reference, window coverage, footprint arithmetic, lm-eval input checks."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qresearch.eval.footprint import footprint
from qresearch.eval.lm_eval_bridge import check_tasks
from qresearch.eval.ppl import chunk_ids, perplexity, sliding_perplexity, sliding_windows
from qresearch.records import LayerResult, QuantResult
from qresearch.quant import ConfigError, QuantSpec, quantize_tensor


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def reference_ppl(model, chunks):
    """exp(mean NLL) from float64 log-softmax, one chunk at a time."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            logp = torch.log_softmax(model(input_ids=c[None]).logits[0].double(), -1)  # [L, V]
            nll -= float(logp[torch.arange(len(c) - 1), c[1:]].sum())
            n += len(c) - 1
    return math.exp(nll / n)


def test_gptq_chunks_match_float64_reference(tiny):
    ids = torch.randint(0, 97, (1, 16 * 10 + 7), generator=torch.Generator().manual_seed(1))
    got = perplexity(tiny, ids, 16, "cpu", batch_size=4)
    ref = reference_ppl(tiny, chunk_ids(ids, 16))
    assert got["n_chunks"] == 10 and got["n_tokens"] == 160 and got["n_predicted"] == 150
    assert math.isclose(got["ppl"], ref, rel_tol=1e-5)
    assert perplexity(tiny, ids, 16, "cpu", max_chunks=3)["n_chunks"] == 3


def test_sliding_with_stride_seqlen_equals_chunks(tiny):
    ids = torch.randint(0, 97, (1, 16 * 6), generator=torch.Generator().manual_seed(2))
    a = perplexity(tiny, ids, 16, "cpu")
    b = sliding_perplexity(tiny, ids, 16, 16, "cpu")
    assert math.isclose(a["ppl"], b["ppl"], rel_tol=1e-6) and b["n_predicted"] == a["n_predicted"]
    c = sliding_perplexity(tiny, ids, 16, 4, "cpu")  # more context per scored token: a different number
    assert c["n_predicted"] == ids.shape[1] - 1 and c["protocol"] == "sliding_window" and c["ppl"] != a["ppl"]


@pytest.mark.parametrize("n,seqlen,stride", [(10, 4, 2), (11, 5, 1), (3, 8, 8), (100, 16, 5), (64, 16, 16)])
def test_sliding_windows_score_each_token_once_with_context(n, seqlen, stride):
    w = sliding_windows(n, seqlen, stride)
    scored = [t for b, e, f in w for t in range(f, e)]
    assert len(scored) == len(set(scored)) and all(e - b <= seqlen and f > b for b, e, f in w)
    if stride < seqlen:
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(n, seqlen, seqlen + 1)


def test_footprint_bits_per_weight_arithmetic():
    lin = torch.nn.Linear(172, 8, bias=False)
    model = torch.nn.Sequential(lin)
    spec = QuantSpec(bits=4, group_size=128)  # 2 groups per row (128 + partial 44)
    res = QuantResult({"0": LayerResult(quantize_tensor(lin.weight.data, spec))})
    f = footprint(model, res)
    bits = 8 * 172 * 4 + 8 * 2 * (16 + 4)  # codes + (fp16 scale + 4-bit zero) per group
    assert f["bits_per_weight"] == pytest.approx(bits / (8 * 172)) and f["weight_bytes"] == pytest.approx(bits / 8)
    sym = QuantResult({"0": LayerResult(quantize_tensor(lin.weight.data, QuantSpec(bits=4, group_size=128, sym=True)))})
    assert footprint(model, sym)["bits_per_weight"] == pytest.approx((8 * 172 * 4 + 8 * 2 * 16) / (8 * 172))
    with_bias = torch.nn.Sequential(torch.nn.Linear(172, 8, bias=True))
    res_b = QuantResult({"0": LayerResult(quantize_tensor(with_bias[0].weight.data, spec))})
    assert footprint(with_bias, res_b)["other_params"] == 8  # the bias is stored at 16 bits, not dropped


def test_lm_eval_local_task_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="piqa_validation.jsonl"):
        check_tasks(["piqa_local"], str(tmp_path))
