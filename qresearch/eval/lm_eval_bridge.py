"""lm-eval-harness on the in-memory (quantized) model: no save and reload, local offline tasks included."""
from __future__ import annotations

import difflib
import importlib.metadata as md
import logging
import tempfile
from pathlib import Path

from ..data.text import hub_reachable
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


def check_tasks(tasks: list[str], data_root: str, include_path: str | None = None) -> None:
    """Fail before model loading if a local task's file is missing, the include folder is missing, or a task name
    is known neither to lm-eval nor to the include folder."""
    _check_files(tasks, data_root, include_path)
    with tempfile.TemporaryDirectory() as tmp:
        task_manager(tasks, data_root, include_path, Path(tmp))


def _check_files(tasks: list[str], data_root: str, include_path: str | None) -> None:
    for t in tasks:
        if t in LOCAL_TASKS and not (Path(data_root) / LOCAL_TASKS[t][0]).is_file():
            raise ConfigError(f"lm-eval task {t} needs {Path(data_root) / LOCAL_TASKS[t][0]}, which is missing; "
                              f"set data.root")
    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ConfigError(f"eval.lm_eval.include_path={include_path} is not a folder; point it to the folder "
                          f"holding your task YAML files")


def check_lm_eval(lm: dict, data_root: str) -> None:
    """The eval.lm_eval block: tasks (check_tasks), add_bos_token, limit / num_fewshot / batch_size ranges."""
    if lm.get("add_bos_token", "auto") not in ("auto", True, False):
        raise ConfigError(f"eval.lm_eval.add_bos_token={lm['add_bos_token']!r} is invalid; allowed: auto, true, "
                          f"false")
    for key, low, none_ok, default in (("limit", 1, True, None), ("num_fewshot", 0, False, 0),
                                       ("batch_size", 1, False, 16)):
        v = lm.get(key, default)
        if not ((v is None and none_ok) or (type(v) is int and v >= low)):
            raise ConfigError(f"eval.lm_eval.{key}={v!r} is invalid; allowed: an int >= {low}"
                              + (" or null (all items)" if none_ok else ""))
    check_tasks(list(lm["tasks"]), data_root, lm.get("include_path"))


def task_manager(tasks: list[str], data_root: str, include_path: str | None, folder: Path):
    """An lm-eval TaskManager that knows `tasks` (our local tasks written to `folder`, the user's include_path,
    and, only when needed, lm-eval's own tasks: indexing those takes seconds); ConfigError for unknown names."""
    from lm_eval.tasks import TaskManager

    write_local_tasks(folder, data_root, tasks)
    paths = [str(folder)] + ([str(Path(include_path).expanduser())] if include_path else [])
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    tm = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        near = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
        hints = "; ".join(f"{t}: did you mean {', '.join(n)}?" for t, n in near.items() if n)
        raise ConfigError(f"lm-eval task(s) {unknown} unknown ({hints or 'no close names'}); local tasks: "
                          f"{', '.join(LOCAL_TASKS)}, tasks in eval.lm_eval.include_path, or lm-eval's own")
    own = [t for t in tasks if t not in local.all_tasks]
    if own and not hub_reachable():
        log.warning("lm-eval task(s) %s come with lm-eval and read their data from the HF Hub, which is "
                    "unreachable; they need a warm datasets cache", own)
    return tm


def resolve_bos(setting, tok) -> tuple[bool, str]:
    """Whether lm-eval requests start with BOS, and why. auto: as the tokenizer does by default, which is how
    models that always saw BOS at the start of a sequence (Llama, llama2.c) were trained."""
    if setting in (True, False):
        return setting, f"eval.lm_eval.add_bos_token={str(setting).lower()}"
    ids = tok("a").input_ids
    adds = tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id
    return adds, f"auto: the tokenizer {'prepends' if adds else 'does not prepend'} BOS by default"


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
                batch_size: int = 16, seed: int = 0, include_path: str | None = None,
                add_bos_token="auto") -> dict:
    """Evaluate lm-eval tasks on `model` as it is in memory. Returns per-task metrics + protocol facts (including
    whether BOS started each request, checked on an encoded request)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    _check_files(tasks, data_root, include_path)
    bos, bos_rule = resolve_bos(add_bos_token, tok)
    with tempfile.TemporaryDirectory() as tmp:
        tm = task_manager(tasks, data_root, include_path, Path(tmp))
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device),
                  add_bos_token=bos)
        probe = lm.tok_encode("Question: a")
        res = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=tm,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=1000)
    return {"tasks": {t: _task_metrics(res, t) for t in tasks},
            "protocol": {"lm_eval_version": md.version("lm_eval"), "limit": limit, "num_fewshot": num_fewshot,
                         "batch_size": batch_size, "add_bos_token": bos, "bos_rule": bos_rule,
                         "bos_in_requests": bool(probe) and probe[0] == tok.bos_token_id,
                         "include_path": str(Path(include_path).expanduser().resolve()) if include_path else None,
                         "in_memory_model": True}}
