"""kernels/launcher.py: the cached CompiledKernel launch path, with a stand-in for Triton's JIT (the cached branch
never runs under the interpreter: there the JIT returns no compiled kernel)."""
import torch

from qresearch.kernels.launcher import Launcher, jit_only


def toy_kernel(x_ptr, y_ptr, n, stride, BLOCK, FLAG=True):  # the parameter order the launcher follows
    pass


class FakeCompiled:
    packed_metadata = object()

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", grid, args))


class FakeJit:
    """kernel[grid](*args, **kw) -> a FakeCompiled, as Triton's JITFunction returns its CompiledKernel."""

    def __init__(self, interpreted=False):
        self.fn, self.log, self.interpreted = toy_kernel, [], interpreted

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            return None if self.interpreted else FakeCompiled(self.log)
        return run


def test_second_call_launches_the_compiled_kernel_with_args_in_parameter_order():
    jit = FakeJit()
    launch = Launcher(jit)
    x, y = torch.zeros(8), torch.zeros(8)
    first = launch((2,), x, y, 8, 1, BLOCK=4, num_warps=2)
    assert launch((2,), x, y, 8, 1, BLOCK=4, num_warps=2) is first and first[1] == (4, True)  # the entry used
    assert [e[0] for e in jit.log] == ["jit", "compiled"]
    assert jit.log[0][3] == {"BLOCK": 4, "num_warps": 2}
    _, grid, args = jit.log[1]
    assert grid == (2, 1, 1)  # the compiled runner indexes three grid dimensions
    assert args[:4] == (x, y, 8, 1) and args[4:] == (4, True)  # constexprs by position, the default filled in


def test_anything_that_can_change_the_compiled_kernel_goes_back_to_the_jit():
    jit = FakeJit()
    launch = Launcher(jit)
    x, y = torch.zeros(16), torch.zeros(16)
    calls = [((x, y, 8, 1), {"BLOCK": 4}, 4),
             ((x[1:], y, 8, 1), {"BLOCK": 4}, 4),  # a pointer 4 bytes off 16-byte alignment
             ((x.half(), y, 8, 1), {"BLOCK": 4}, 4),  # another dtype
             ((x, y, 16, 1), {"BLOCK": 4}, 4),  # another integer value
             ((x, y, 8, 1), {"BLOCK": 8}, 4),  # another constexpr
             ((x, y, 8, 1), {"BLOCK": 4}, 8)]  # other launch options
    for args, kw, warps in calls:
        launch((1,), *args, num_warps=warps, **kw)
    assert [e[0] for e in jit.log] == ["jit"] * len(calls)
    for args, kw, warps in calls:  # each key now cached
        launch((1,), *args, num_warps=warps, **kw)
    assert [e[0] for e in jit.log[len(calls):]] == ["compiled"] * len(calls)


def test_under_the_interpreter_every_call_is_a_jit_call():
    jit = FakeJit(interpreted=True)
    launch = Launcher(jit)
    for _ in range(3):
        assert launch((1,), torch.zeros(4), torch.zeros(4), 4, 1, BLOCK=4) is None
    assert [e[0] for e in jit.log] == ["jit"] * 3 and not launch.cache


def test_jit_only_bypasses_the_cache_and_restores_it():
    jit = FakeJit()
    launch = Launcher(jit)
    args = (torch.zeros(4), torch.zeros(4), 4, 1)
    launch((1,), *args, BLOCK=4)
    with jit_only():
        assert launch((1,), *args, BLOCK=4) is None  # no entry handed out for a caller to launch itself
    launch((1,), *args, BLOCK=4)
    assert [e[0] for e in jit.log] == ["jit", "jit", "compiled"]
