"""What every section of the GPU suite shares: the run context, the time budget, error measures, model builders."""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


class BudgetExceeded(BaseException):
    """Raised (from SIGALRM) when the suite's --budget-s is spent; BaseException so no `except Exception` in a
    section swallows it."""


class Budget:
    """Wall-clock budget of the whole suite; sections ask `left()` before each costly step."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = float(seconds), time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()

    def arm(self) -> None:
        """Interrupt whatever runs when the budget ends (the interrupted step is recorded, results are kept)."""
        if hasattr(signal, "SIGALRM"):
            def _raise(*_):
                raise BudgetExceeded(f"--budget-s {self.seconds:.0f} spent")

            signal.signal(signal.SIGALRM, _raise)
            signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))

    def disarm(self) -> None:
        if hasattr(signal, "SIGALRM"):
            signal.setitimer(signal.ITIMER_REAL, 0)


@dataclass
class Ctx:
    """One suite run: device, mode, budget, and `save()` to write the report so far (called after each step)."""

    device: torch.device
    quick: bool
    budget: Budget
    save: Callable[[], None] = lambda: None
    copy_bw: float = float("nan")  # bytes/s, read + write, measured in the env section
    facts: dict = field(default_factory=dict)
    reference: str | None = None  # --reference: folder of the original GPTQ's gptq.py + quant.py (section gptq_ref)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def full(self) -> bool:
        """Full-size shapes and models (a GPU run without --quick); otherwise tiny ones."""
        return self.gpu and not self.quick

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype of the benchmark / e2e models: fp16 on GPU; fp32 on CPU (CPU fp16 is no baseline)."""
        return torch.float16 if self.gpu else torch.float32

    reserve_s: float = 0.0  # budget kept for the later sections' minimum (set by the orchestrator)

    def skip_reason(self, need_s: float, what: str, reserve: bool = True) -> str | None:
        """None when `need_s` fits the budget left (less what later sections reserve), else why it is skipped."""
        left = self.budget.left() - (self.reserve_s if reserve else 0.0)
        if left >= need_s:
            return None
        held = f" after {self.reserve_s:.0f} s kept for later sections" if reserve and self.reserve_s else ""
        return f"{what}: needs ~{need_s:.0f} s, {max(left, 0):.0f} s of budget left{held}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_clocks(device: torch.device, seconds: float = 1.0) -> dict:
    """Keep the GPU busy with fp16 matmuls for `seconds` so its clocks are at their working level before timing or
    autotuning starts (an idle H100 read 345 MHz, and after the mostly-compiling correctness section the first
    shape's autotuned configs and timings were the run's outliers). Returns the SM clock before and after (MHz,
    from torch.cuda.clock_rate where available). No-op on CPU."""
    if device.type != "cuda":
        return {}
    clock = getattr(torch.cuda, "clock_rate", None)
    read = (lambda: _safe(lambda: clock(device))) if clock else (lambda: None)
    before = read()
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize(device)
    return {"sm_mhz_before": before, "sm_mhz_after": read(), "seconds": round(time.perf_counter() - t0, 2)}


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a clock reading is informational (needs pynvml)
        return None


def errors(y: torch.Tensor, truth: torch.Tensor) -> dict:
    """max |y - truth|, relative Frobenius error (float64), and whether every element is finite."""
    y64, t64 = y.double(), truth.double()
    finite = bool(torch.isfinite(y64).all())
    d = (y64 - t64).nan_to_num(nan=float("inf"))
    return {"max_abs": float(d.abs().max()) if d.numel() else 0.0,
            "rel": float(d.norm() / t64.norm().clamp_min(1e-30)), "finite": finite}


def poison_allocator(device: torch.device, numel: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """Leave NaN-filled freed blocks of `numel` elements in the CUDA caching allocator, so a kernel's next
    torch.empty output of that size most likely starts as NaN: an element the kernel never writes shows up."""
    if device.type != "cuda":
        return
    blocks = [torch.full((numel,), float("nan"), dtype=d, device=device) for d in dtypes]
    del blocks


def build_causal_lm(config_kwargs: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A Llama-family causal LM from a config dict with random weights, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(config_kwargs)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    where = next(model.parameters()).device
    if where.type != device.type:
        raise RuntimeError(f"from_config built the model on {where}, not {device}: the torch.device context was "
                           f"not honoured by this transformers version")
    return model.eval()


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
