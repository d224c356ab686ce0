"""Calibration engine: block i's captured inputs equal the model's own hidden states entering block i."""
import pytest
import torch

from tests.pipeline_helpers import TINY, stories260k, tiny_model
from qresearch.models.arch import arch_for, block_linears, blocks_of
from qresearch.calib.blockio import capture_inputs
from qresearch.calib.engine import EngineConfig, calibrate
from qresearch.calib.hooks import record_inputs
from qresearch.quant.spec import ConfigError


def _check_engine_matches_model(model, ids):
    arch = arch_for(model)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states  # [n_layers + 1] x [b, seq, h]
    seen = {}

    def process(i, block, io):
        seen[i] = torch.cat(io.hidden)  # [n, seq, h]
        return {}

    calibrate(model, arch, ids, torch.device("cpu"), process, EngineConfig(batch_size=2))
    n = len(blocks_of(model, arch))
    assert sorted(seen) == list(range(n))
    for i in range(n):
        torch.testing.assert_close(seen[i], ref[i], rtol=1e-4, atol=1e-5, msg=f"block {i} inputs differ")


@pytest.mark.parametrize("kind", sorted(TINY))
def test_engine_inputs_equal_model_hidden_states(kind):
    torch.manual_seed(0)
    _check_engine_matches_model(tiny_model(kind), torch.randint(0, 128, (5, 16)))  # 3 batches, last partial


def test_engine_on_stories260k():
    torch.manual_seed(0)
    _check_engine_matches_model(stories260k(), torch.randint(0, 512, (4, 64)))


def test_engine_propagates_quantized_weights():
    """With propagate=quantized, block i+1 sees the output of block i with the weights process() returned."""
    model, ids = tiny_model("llama"), torch.randint(0, 128, (2, 16))
    arch = arch_for(model)
    seen = {}

    def process(i, block, io):
        seen[i] = torch.cat(io.hidden)
        return {n: torch.zeros_like(lin.weight) for n, lin in block_linears(block, arch).items()}

    calibrate(model, arch, ids, torch.device("cpu"), process, EngineConfig(propagate="quantized"))
    # zero linears: attention and MLP add nothing, so block 1's input equals block 0's input
    torch.testing.assert_close(seen[1], seen[0])
    # and the FP weights are back in place afterwards
    assert all(lin.weight.abs().sum() > 0 for lin in block_linears(blocks_of(model, arch)[0], arch).values())


def test_record_inputs_stop_after_sees_linear_input():
    model, ids = tiny_model("opt"), torch.randint(0, 128, (2, 8))
    arch = arch_for(model)
    io = capture_inputs(model, arch, ids, torch.device("cpu"), 2)
    block = blocks_of(model, arch)[0]
    got = []
    record_inputs(block, io, ["fc2"], lambda n, x: got.append(x), stop_after=True)
    ref = []
    h = block.fc2.register_forward_pre_hook(lambda m, a: ref.append(a[0]))
    with torch.no_grad():
        block(io.hidden[0], **io.kwargs[0])
    h.remove()
    torch.testing.assert_close(got[0], ref[0])


def test_bad_propagate_is_config_error():
    with pytest.raises(ConfigError, match="propagate='both'"):
        EngineConfig(propagate="both")


def test_unknown_architecture_names_class_and_table():
    from torch import nn

    class Foo(nn.Module):
        config = type("C", (), {"model_type": "foo"})()

    with pytest.raises(ConfigError, match=r"Foo.*extend qresearch/models/arch.py"):
        arch_for(Foo())
