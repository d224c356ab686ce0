"""lm-eval-harness on the in-memory (quantized) model: no save and reload, local offline tasks included."""
from __future__ import annotations

import importlib.metadata as md
import logging
import tempfile
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

# Offline tasks that read files under data.root: name -> (relative file, YAML body with {path})
LOCAL_TASKS = {
    "piqa_local": ("piqa/piqa_validation.jsonl", """task: piqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: "{path}"
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
  source: "PIQA validation (local jsonl); same prompt format as lm-eval's piqa task"
"""),
}


def check_tasks(tasks: list[str], data_root: str) -> None:
    """Fail before model loading if a local task's file is missing."""
    for t in tasks:
        if t in LOCAL_TASKS and not (Path(data_root) / LOCAL_TASKS[t][0]).is_file():
            raise ConfigError(f"lm-eval task {t} needs {Path(data_root) / LOCAL_TASKS[t][0]}, which is missing; "
                              f"set data.root")


def write_local_tasks(folder: Path, data_root: str, tasks: list[str]) -> Path:
    """Write YAMLs for the requested local tasks into `folder` (an lm-eval include path)."""
    for t in tasks:
        if t in LOCAL_TASKS:
            rel, body = LOCAL_TASKS[t]
            (folder / f"{t}.yaml").write_text(body.format(path=(Path(data_root) / rel).resolve()))
    return folder


def _task_metrics(res: dict, task: str) -> dict:
    """{'acc': .., 'acc_stderr': .., 'acc_norm': .., ...} from lm-eval's 'metric,filter' keys."""
    out = {}
    for key, val in res["results"][task].items():
        if "," in key and isinstance(val, (int, float)):
            name, _filter = key.split(",", 1)
            out[name] = float(val)
    out["n_samples"] = res.get("n-samples", {}).get(task, {}).get("effective")
    out["version"] = res.get("versions", {}).get(task)
    return out


def run_lm_eval(model, tok, tasks: list[str], data_root: str, limit: int | None = None, num_fewshot: int = 0,
                batch_size: int = 16, seed: int = 0) -> dict:
    """Evaluate lm-eval tasks on `model` as it is in memory. Returns per-task metrics + protocol facts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks, data_root)
    with tempfile.TemporaryDirectory() as tmp:
        include = write_local_tasks(Path(tmp), data_root, tasks)
        tm = TaskManager(include_path=str(include))
        unknown = [t for t in tasks if t not in tm.all_tasks]
        if unknown:
            raise ConfigError(f"lm-eval task(s) {unknown} unknown; local tasks: {', '.join(LOCAL_TASKS)}, "
                              f"or any lm-eval task name (Hub data needs network)")
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
        res = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=tm,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    return {"tasks": {t: _task_metrics(res, t) for t in tasks},
            "protocol": {"lm_eval_version": md.version("lm_eval"), "limit": limit, "num_fewshot": num_fewshot,
                         "batch_size": batch_size, "add_bos_token": bool(getattr(lm, "add_bos_token", False)),
                         "in_memory_model": True}}
