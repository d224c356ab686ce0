"""Runs INSIDE the llm-compressor virtual environment (experiments/peers/setup_venv.sh), driven by
experiments/peers.py: quantize a local HF model folder with llm-compressor on the calibration windows the harness
chose (a torch file of token ids), evaluate its own in-memory model on the harness's eval chunks with the harness's
perplexity code, save the compressed-tensors checkpoint, write result.json.

    <venv>/bin/python experiments/peers/llmc_worker.py job.json
job.json: model_dir, tokenizer_dir, calib_ids, eval_ids, eval_seqlen, recipe (rtn | gptq | awq), bits, group_size
(-1 = per channel), sym, out_dir, threads.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # qresearch.eval.ppl: torch-only, the same perplexity code as the harness


def scheme(bits: int, group_size: int, sym: bool) -> dict:
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
         "strategy": "channel" if group_size == -1 else "group", "observer": "minmax"}
    if group_size != -1:
        w["group_size"] = group_size
    return {"group_0": {"targets": ["Linear"], "weights": w}}


def recipe(job: dict) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    groups, ignore = scheme(job["bits"], job["group_size"], job["sym"]), ["lm_head"]
    if job["recipe"] == "rtn":
        return [QuantizationModifier(config_groups=groups, ignore=ignore)]
    if job["recipe"] == "gptq":
        return [GPTQModifier(config_groups=groups, ignore=ignore, dampening_frac=0.01, block_size=128, actorder=None)]
    if job["recipe"] == "awq":
        from llmcompressor.modifiers.transform import AWQModifier

        return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=groups, ignore=ignore)]
    raise ValueError(f"recipe={job['recipe']!r}; allowed: rtn, gptq, awq")


def cpu_only_workaround() -> bool:
    """llm-compressor 0.14's AWQ pins cached activations (pin_memory) for faster host-to-GPU copies, which raises
    'Cannot access accelerator device' on a machine without one; pinning changes no value, so without an
    accelerator it is skipped. Returns whether the workaround is on (recorded in result.json)."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        return False
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return True


def run(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qresearch.eval.ppl import perplexity

    torch.set_num_threads(int(job.get("threads", 2)))
    no_pinning = cpu_only_workaround()
    tok = AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    calib = torch.load(job["calib_ids"], weights_only=True)  # [n, seqlen] the harness's C4 windows
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe(job), num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - t0
    model.eval()
    ids = torch.load(job["eval_ids"], weights_only=True)  # [1, N]
    ppl = perplexity(model, ids, int(job["eval_seqlen"]), torch.device("cpu"), None, 1, desc="llmc")
    out = Path(job["out_dir"])
    model.save_pretrained(out / "checkpoint", save_compressed=True)
    tok.save_pretrained(out / "checkpoint")
    import compressed_tensors
    import llmcompressor
    import transformers

    return {"status": "ok", "quantize_seconds": seconds, "ppl": ppl, "pin_memory_skipped": no_pinning,
            "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
            "checkpoint_bytes": sum(f.stat().st_size for f in (out / "checkpoint").glob("*.safetensors"))}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    try:
        res = run(job)
    except Exception as e:  # noqa: BLE001 - recorded (a refusal is a result), never hidden
        res = {"status": "refused" if isinstance(e, (ValueError, NotImplementedError)) else "error",
               "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}",
               "traceback": traceback.format_exc()[-4000:]}
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "traceback"}))


if __name__ == "__main__":
    main()
