"""A method that crashes mid-run (after planning succeeded): used to test failure records in sweeps."""
from qresearch.method import Method


class Crash(Method):
    name = "crash"

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def quantize(self, model, ctx):
        raise RuntimeError("deliberate crash for tests")
