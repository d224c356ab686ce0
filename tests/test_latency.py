"""Latency harness: protocol (warm-up, repeats, capped lengths) and result structure; no timing assertions."""
import torch

from qresearch.eval.latency import LatencyConfig, measure_latency, timed


def test_timed_runs_warmup_then_repeats():
    calls = []
    t = timed(lambda: calls.append(1), torch.device("cpu"), repeats=4, warmup=3)
    assert len(calls) == 7 and len(t) == 4 and all(x >= 0 for x in t)


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_measure_latency_caps_lengths_and_reports_protocol():
    model = _tiny_llama()
    cfg = LatencyConfig(True, prompt_lengths=[8, 2048], decode_tokens=64, batch_sizes=[1, 3], repeats=2, warmup=1)
    res = measure_latency(model, torch.device("cpu"), cfg)
    assert set(res["prefill"]) == {"8", "40"}  # 2048 capped to max_position_embeddings
    assert res["timer"] == "perf_counter" and res["device"] == "cpu" and res["repeats"] == 2
    for b in ("1", "3"):
        d = res["decode"][b]
        assert d["prompt_tokens"] + d["new_tokens"] <= 40 and d["tokens_per_s"] > 0
    assert len(res["prefill"]["8"]["all_ms"]) == 2 and "peak_rss_bytes" in res["peak_memory"]
