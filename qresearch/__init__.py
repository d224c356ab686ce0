"""qresearch: post-training quantization research harness. `qresearch.run(cfg)` runs one configured experiment."""

__version__ = "0.1.0"


def run(cfg):
    """Lazy wrapper so `import qresearch` stays fast (heavy imports happen on first use)."""
    from .runner import run as _run

    return _run(cfg)
