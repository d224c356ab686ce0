"""Activation outlier report, for every run that quantizes activations: per linear input (one per group of linears
sharing it), max |x|, mean per-token kurtosis, channels whose max |x| reaches 6.0 (LLM.int8()'s threshold) and the
fraction of tokens holding such a value, measured on the first calibration windows on the FP model before the method
steps and again after them when a step folded scales into the model (smoothing). Also the outlier columns LLM.int8()
layers decomposed during evaluation. Written to the run dir (outliers.csv, outliers.png, decomposition.csv).
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.arch import blocks_of, present_groups

THRESHOLD = 6.0  # LLM.int8()'s outlier magnitude
WINDOWS = 8  # calibration windows measured (the first ones of the run's calibration set, same seed)


@dataclass
class InputStats:
    """Running outlier statistics of one linear input x [..., C]."""

    absmax: torch.Tensor | None = None  # [C] max |x| per channel
    tokens: int = 0
    kurt_sum: float = 0.0  # sum over tokens of the kurtosis across channels
    rows_over: int = 0  # tokens with some |x| >= THRESHOLD

    def update(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).double()  # [tokens, C]
        a = x2.abs().amax(0).float().cpu()
        self.absmax = a if self.absmax is None else torch.maximum(self.absmax, a)
        c = x2 - x2.mean(1, keepdim=True)
        m2, m4 = c.pow(2).mean(1), c.pow(4).mean(1)  # [tokens]
        self.kurt_sum += float((m4 / m2.pow(2).clamp_min(1e-300)).sum())
        self.rows_over += int((x2.abs() >= THRESHOLD).any(1).sum())
        self.tokens += x2.shape[0]

    def row(self) -> dict:
        a = self.absmax
        return {"channels": a.numel(), "max_abs": float(a.max()), "median_channel_max": float(a.median()),
                "kurtosis": self.kurt_sum / max(self.tokens, 1), "channels_over": int((a >= THRESHOLD).sum()),
                "rows_over_frac": self.rows_over / max(self.tokens, 1), "top_channel": int(a.argmax())}


@torch.no_grad()
def measure(model, arch, ids: torch.Tensor, device, batch_size: int = 4) -> dict[str, InputStats]:
    """InputStats of the first linear of every group in every block (full names) over ids [n, seq]."""
    stats: dict[str, InputStats] = {}
    handles = []
    for i, block in enumerate(blocks_of(model, arch)):
        for grp in present_groups(block, arch):
            name = f"{arch.blocks}.{i}.{grp[0]}"
            stats[name] = InputStats()
            handles.append(block.get_submodule(grp[0]).register_forward_pre_hook(
                lambda _m, args, n=name: stats[n].update(args[0])))
    try:
        for j in range(0, len(ids), batch_size):
            model(input_ids=ids[j:j + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return stats


def summarize(rows: list[dict]) -> dict:
    """One line per phase: the worst input, how many inputs / channels cross the threshold, kurtosis."""
    if not rows:
        return {}
    return {"max_abs": max(r["max_abs"] for r in rows), "inputs": len(rows),
            "inputs_with_outliers": sum(r["channels_over"] > 0 for r in rows),
            "channels_over": sum(r["channels_over"] for r in rows),
            "kurtosis_mean": sum(r["kurtosis"] for r in rows) / len(rows), "kurtosis_max": max(r["kurtosis"] for r in rows)}


@dataclass
class OutlierWatch:
    """Measures before the method steps (at creation), after them (`after_steps`), and reports (`finish`)."""

    model: object
    arch: object
    ids: torch.Tensor
    device: torch.device
    provenance: dict
    phases: dict = field(default_factory=dict)  # phase -> {input name: InputStats}

    def __post_init__(self):
        self.phases["before"] = measure(self.model, self.arch, self.ids, self.device)

    def after_steps(self, model, folded: bool) -> None:
        """Measure again on the model the steps left (FP linears, before the swap) when they folded scales."""
        if folded:
            self.phases["after"] = measure(model, self.arch, self.ids, self.device)

    def rows(self) -> list[dict]:
        return [{"phase": ph, "input": name, **st.row()} for ph, stats in self.phases.items() for name, st in stats.items()]

    def finish(self, model, out_dir: Path, logger) -> dict:
        """Write outliers.csv / .png (and decomposition.csv for LLM.int8() layers), log tables; return the summary."""
        rows = self.rows()
        _write_csv(out_dir / "outliers.csv", rows)
        logger.table("outliers", rows)
        dec = decomposition_rows(model)
        if dec:
            _write_csv(out_dir / "decomposition.csv", dec)
            logger.table("decomposition", dec)
        drew = draw(self.phases, out_dir / "outliers.png")
        return {"threshold": THRESHOLD, "windows": int(self.ids.shape[0]), "seqlen": int(self.ids.shape[1]),
                "calibration": self.provenance, "picture": "outliers.png" if drew else None,
                **{ph: summarize([r for r in rows if r["phase"] == ph]) for ph in self.phases},
                "decomposition": summarize_decomposition(dec) if dec else None}


def decomposition_rows(model) -> list[dict]:
    """Per LLM.int8() layer: what its per-call decompositions touched during evaluation."""
    out = []
    for name, m in model.named_modules():
        counter = getattr(m, "outlier_counter", None)
        if counter is not None:
            s = counter.summary()
            out.append({"layer": name, **{k: v for k, v in s.items() if k != "outlier_columns"},
                        "first_columns": " ".join(map(str, s["outlier_columns"][:16]))})
    return out


def summarize_decomposition(rows: list[dict]) -> dict:
    with_any = [r for r in rows if r["outlier_columns_seen"] > 0]
    return {"layers": len(rows), "layers_with_outliers": len(with_any),
            "max_columns_seen": max(r["outlier_columns_seen"] for r in rows),
            "mean_columns_per_call": sum(r["mean_columns_per_call"] for r in rows) / len(rows),
            "max_fraction_rows_affected": max(r["fraction_rows_affected"] for r in rows)}


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def draw(phases: dict, path: Path) -> bool:
    """Heatmaps of log10 max |x| per channel (x) by linear input (y), one column per input width, one row per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({st.absmax.numel() for stats in phases.values() for st in stats.values()})
    if not widths:
        return False
    fig, axes = plt.subplots(len(phases), len(widths), figsize=(5.5 * len(widths), 3.2 * len(phases)), squeeze=False)
    for r, (phase, stats) in enumerate(phases.items()):
        for c, width in enumerate(widths):
            names = [n for n, st in stats.items() if st.absmax.numel() == width]
            img = torch.stack([stats[n].absmax for n in names]).clamp_min(1e-3).log10()  # [inputs, channels]
            ax = axes[r][c]
            im = ax.imshow(img.numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                           vmin=-1, vmax=max(math.log10(THRESHOLD) + 1, float(img.max())))
            ax.set_title(f"{phase}: inputs of width {width} ({len(names)})", fontsize=9)
            ax.set_xlabel("channel")
            ax.set_ylabel("linear input (block order)")
            fig.colorbar(im, ax=ax, label=f"log10 max|x| (threshold {THRESHOLD}: {math.log10(THRESHOLD):.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def start_watch(plan, model, arch, tok, device) -> OutlierWatch | None:
    """The run's outlier watch (measuring the FP model now), or None when no step quantizes activations.
    Windows: the first WINDOWS of the run's calibration set (data=...), never eval text."""
    if plan.facts["act_bits"] == 16:
        return None
    from ..data.tokens import calibration_ids

    c = plan.calib
    limit = getattr(model.config, "max_position_embeddings", None) or c["seqlen"]
    ids, prov = calibration_ids(c["name"], tok, WINDOWS, min(int(c["seqlen"]), int(limit)), plan.seed, c["root"],
                                c["source"])
    if str(prov.get("origin", "")).startswith("local:"):  # name the file relative to the data root
        path = Path(prov["origin"][len("local:"):]).resolve()
        root = Path(c["root"]).resolve()
        prov["origin"] = f"local:{path.relative_to(root)}" if path.is_relative_to(root) else prov["origin"]
    return OutlierWatch(model, arch, ids, device, prov)
