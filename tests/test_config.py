"""Tests for sfrik_scale.config (recipes, overrides, validation, save/load) and sfrik_scale.ds_config."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfrik_scale.config import (
    CONFIG_FILENAME,
    Config,
    ConfigError,
    describe_fields,
    list_recipes,
    load_config,
    recipe_summary,
    recipe_text,
)
from sfrik_scale.ds_config import (
    DS_CONFIGS_DIR,
    FP16_DYNAMIC_LOSS_SCALING,
    build_ds_config,
    check_batch_keys,
)
from sfrik_scale.topology import free_port

REPO = Path(__file__).resolve().parent.parent
PAPER_RECIPES = {
    "demo", "imagenet_sfrik_r50", "imagenet_vicreg_r50", "imagenet20_simclr_r18",
    "imagenet20_align_uniform_r18", "imagenet20_vicreg_r18",
    *(f"imagenet20_sfrik_r18_q{q}" for q in (1024, 2048, 4096, 8192)),
}
DATA = "data.path=/data/imagenet/train"  # folder recipes require a path; it is not opened here


def load(recipe: str = "demo", *overrides: str, world_size=None) -> Config:
    extra = [DATA] if "dataset: image_folder" in recipe_text(recipe) else []
    return load_config(recipe, [*extra, *overrides], world_size=world_size)


# --------------------------------------------------------------------------- recipes

def test_the_recipes_of_the_paper_are_shipped():
    assert PAPER_RECIPES <= set(list_recipes())


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = load(recipe)
    world = 1 if recipe == "demo" else 8
    cfg.validate(world)
    assert build_ds_config(cfg, world)["gradient_clipping"] == 0.0


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_starts_with_a_comment_header_naming_its_source(recipe):
    header = recipe_text(recipe).splitlines()[0]
    assert header.startswith(f"# {recipe}:")


def test_no_source_means_the_demo():
    assert load_config(None, []) == load_config("demo", [])


def test_demo_is_small_synthetic_fp32_zero0_sfrik_l3():
    cfg = load_config()
    assert (cfg.data.dataset, cfg.deepspeed.precision, cfg.deepspeed.zero_stage) == ("synthetic", "fp32", 0)
    assert cfg.loss.name == "sfrik" and len(cfg.loss.coeffs) == 3
    assert cfg.data.image_size <= 32 and cfg.model.embedding_dim <= 1024


def test_imagenet_sfrik_r50_has_the_published_numbers():
    cfg = load("imagenet_sfrik_r50")
    assert cfg.model.backbone == "resnet50" and cfg.model.projector == "8192-8192-32768"
    assert cfg.loss.coeffs == (1.0, 40.0, 40.0)
    assert (cfg.loss.sim_coeff, cfg.loss.mmd_coeff) == (40000.0, 1.0)
    assert (cfg.train.epochs, cfg.train.global_batch_size) == (200, 2048)
    assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.warmup_epochs) == ("lars", 0.4, 10.0)
    assert cfg.peak_lr == pytest.approx(0.4 * 2048 / 256)


def test_imagenet20_q_variants_differ_only_in_projector_width_and_run_dir():
    base = load("imagenet20_sfrik_r18_q8192").to_dict()
    for q in (1024, 2048, 4096):
        other = load(f"imagenet20_sfrik_r18_q{q}").to_dict()
        assert other["model"].pop("projector") == f"8192-8192-{q}"
        assert other["train"].pop("run_dir").endswith(f"q{q}")
        expected = json.loads(json.dumps(base))
        del expected["model"]["projector"], expected["train"]["run_dir"]
        assert other == expected
    assert base["data"]["images_per_class"] == 260 and base["optim"]["base_lr"] == 1.2


def test_unknown_recipe_suggests_a_close_name():
    with pytest.raises(ConfigError, match="did you mean demo") as err:
        load_config("demi")
    assert err.value.key == "--config"


def test_recipe_file_with_unknown_section_names_it(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainn:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="did you mean train") as err:
        load_config(str(path))
    assert err.value.key == "trainn"


def test_recipe_file_that_is_not_yaml_raises_config_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


# --------------------------------------------------------------------------- overrides

def test_overrides_apply_with_their_types():
    cfg = load_config("demo", ["train.epochs=3", "loss.coeffs=[1,40]", "optim.weight_decay=1e-5",
                               "train.max_steps=null", "data.dataset=image_folder", "data.path=/data/x",
                               "deepspeed.gradient_clipping=1"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.loss.coeffs == (1.0, 40.0) and all(isinstance(b, float) for b in cfg.loss.coeffs)
    assert cfg.optim.weight_decay == 1e-5  # PyYAML reads 1e-5 as a string: converted
    assert cfg.train.max_steps is None and cfg.data.path == "/data/x"
    assert cfg.deepspeed.gradient_clipping == 1.0 and isinstance(cfg.deepspeed.gradient_clipping, float)


def test_string_fields_keep_the_override_text_verbatim():
    cfg = load_config("demo", ["model.projector=2048-12-31"])  # would be a date as YAML
    assert cfg.model.projector == "2048-12-31"


def test_later_override_wins():
    assert load_config("demo", ["train.epochs=3", "train.epochs=5"]).train.epochs == 5


def test_unset_loss_coefficients_take_the_loss_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("loss:\n  name: vicreg\n")
    loss = load_config(str(path)).loss
    assert (loss.sim_coeff, loss.std_coeff, loss.cov_coeff) == (25.0, 25.0, 1.0)


# (override, the key its ConfigError names, a fragment of the message); the README reports the count.
BAD_OVERRIDES = [
    ("train.epoch=3", "train.epoch", "did you mean train.epochs"),
    ("trian.epochs=3", "trian.epochs", "did you mean train.epochs"),
    ("train.epochs=three", "train.epochs", "expected an integer"),
    ("train.epochs=2.5", "train.epochs", "expected an integer"),
    ("monitor.tensorboard=1", "monitor.tensorboard", "expected true or false"),
    ("loss.name=sfirk", "loss.name", "did you mean sfrik"),
    ("deepspeed.precision=fp8", "deepspeed.precision", "must be one of"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage", "must be one of"),
    ("model.projector=8192-x-512", "model.projector", "not a spec"),
    ("model.projector=0-512", "model.projector", "not a spec"),
    ("model.projector=8192-1", "model.projector", "q = 1 must be >= 2"),
    ("loss.coeffs=[1,-40,40]", "loss.coeffs", "b_2 = -40.0 is negative"),
    ("loss.coeffs=[0,0]", "loss.coeffs", "all coefficients are zero"),
    ("loss.coeffs=[]", "loss.coeffs", "at least b_1"),
    ("loss.coeffs=40", "loss.coeffs", "expected a list of numbers"),
    ("loss.temperature=0", "loss.temperature", "must be > 0"),
    ("optim.base_lr=.nan", "optim.base_lr", "finite"),
    ("optim.warmup_epochs=20", "optim.warmup_epochs", "train.epochs"),
    ("data.dataset=image_folder", "data.path", "required for dataset 'image_folder'"),
    ("data.path=/data/pics", "data.path", "add data.dataset=image_folder"),
    ("train.epochs=-1", "train.epochs", "must be >= 1, got -1"),
    ("data.dataset=folder", "data.dataset", "did you mean image_folder"),
    ("train.micro_batch_size=100", "train.global_batch_size", "not divisible by train.micro_batch_size"),
    ("deepspeed.offload_optimizer=true", "deepspeed.offload_optimizer", "zero_stage >= 1"),
    ("deepspeed.extra.optimizer={type: Adam}", "deepspeed.extra.optimizer", "own optimizer"),
    ("deepspeed.extra.gradient_clipping=1.0", "deepspeed.extra.gradient_clipping", "deepspeed.gradient_clipping"),
    ("deepspeed.extra.zero_optimization.stage=3", "deepspeed.extra.zero_optimization.stage", "deepspeed.zero_stage"),
    ("deepspeed.extra.train_batch_size=64", "deepspeed.extra.train_batch_size", "train.global_batch_size"),
    ("deepspeed.config_file=zero9", "deepspeed.config_file", "did you mean"),
    ("train.epochs", "train.epochs", "section.field=value"),
    ("train.epochs.x=1", "train.epochs.x", "no sub-keys"),
]


@pytest.mark.parametrize("override, key, fragment", BAD_OVERRIDES)
def test_bad_override_raises_config_error_naming_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert err.value.key == key
    assert str(err.value).startswith(key + ":") and fragment in str(err.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- world size

def test_global_batch_not_divisible_by_world_size_names_the_key():
    cfg = load_config("demo", ["train.global_batch_size=256"])
    with pytest.raises(ConfigError, match="not divisible by the world size 3") as err:
        cfg.validate(3)
    assert err.value.key == "train.global_batch_size"


def test_global_batch_not_divisible_by_micro_times_world_names_both():
    cfg = load_config("demo", ["train.global_batch_size=256", "train.micro_batch_size=64"])
    cfg.validate(2)
    with pytest.raises(ConfigError, match="micro_batch_size x world_size = 64 x 8") as err:
        cfg.validate(8)
    assert err.value.key == "train.global_batch_size"


def test_load_config_checks_the_world_size_when_given():
    with pytest.raises(ConfigError, match="world size 3"):
        load_config("demo", [], world_size=3)


# --------------------------------------------------------------------------- save / load

def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = load_config("demo", ["train.epochs=3", "loss.coeffs=[1,40]", "optim.weight_decay=1e-5",
                               "deepspeed.extra.zero_optimization.overlap_comm=false", "data.dataset=file_list",
                               "data.path=/x y/z"])
    path = cfg.save(tmp_path / "run")
    assert path == tmp_path / "run" / CONFIG_FILENAME
    assert Config.load(tmp_path / "run") == cfg
    assert load_config(str(path)) == cfg


def test_saved_config_is_self_contained_after_a_template(tmp_path):
    cfg = load_config("demo", ["deepspeed.config_file=zero3_bf16_offload"])
    text = cfg.save(tmp_path).read_text()
    assert "config_file: null" in text
    assert load_config(str(tmp_path / CONFIG_FILENAME)) == cfg


def test_every_field_has_help():
    rows = describe_fields()
    assert len(rows) == sum(len(dataclasses.fields(cls)) for cls in
                            (f.default_factory for f in dataclasses.fields(Config)))
    assert all(len(help_text) > 10 for _, _, _, help_text in rows)


# --------------------------------------------------------------------------- ds_config

@pytest.mark.parametrize("micro, world, expected", [(None, 1, (256, 1)), (None, 4, (64, 1)), (32, 2, (32, 4))])
def test_ds_config_batch_keys_multiply_to_the_global_batch(micro, world, expected):
    cfg = load_config("demo", ["train.global_batch_size=256", f"train.micro_batch_size={micro or 'null'}"])
    ds = build_ds_config(cfg, world)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == expected
    assert ds["train_batch_size"] == 256


def test_inconsistent_batch_keys_raise_naming_them():
    bad = {"train_batch_size": 256, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError, match=r"train_batch_size \(256\) != train_micro_batch_size_per_gpu \(32\) x "
                                          r"gradient_accumulation_steps \(2\) x world_size \(2\)"):
        check_batch_keys(bad, 2)


def test_gradient_clipping_is_always_written_explicitly():
    assert build_ds_config(load_config(), 1)["gradient_clipping"] == 0.0
    assert build_ds_config(load_config("demo", ["deepspeed.gradient_clipping=2.5"]), 1)["gradient_clipping"] == 2.5


def test_ds_config_has_no_optimizer_or_scheduler():
    ds = build_ds_config(load("imagenet_sfrik_r50"), 8)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_allow_untested_optimizer"] is True


def test_fp16_gets_dynamic_loss_scaling():
    ds = build_ds_config(load_config("demo", ["deepspeed.precision=fp16"]), 1)
    assert ds["fp16"] == {"enabled": True, **FP16_DYNAMIC_LOSS_SCALING} and ds["fp16"]["loss_scale"] == 0
    assert ds["bf16"] == {"enabled": False}


def test_offload_puts_optimizer_state_on_pinned_cpu():
    ds = build_ds_config(load_config("demo", ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]), 1)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}


def test_extra_is_merged_last_into_nested_sections():
    cfg = load_config("demo", ["deepspeed.zero_stage=2", "deepspeed.extra.zero_optimization.overlap_comm=false",
                               "deepspeed.extra.fp16.initial_scale_power=12"])
    ds = build_ds_config(cfg, 1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert ds["fp16"]["initial_scale_power"] == 12


def test_template_named_by_an_override_sets_fields_and_later_overrides_win():
    ds = load_config("demo", ["deepspeed.config_file=zero3_bf16_offload"]).deepspeed
    assert (ds.zero_stage, ds.precision, ds.offload_optimizer, ds.config_file) == (3, "bf16", True, None)
    assert ds.extra["zero_optimization"]["stage3_prefetch_bucket_size"] == 50_000_000
    ds = load_config("demo", ["deepspeed.config_file=zero3_bf16_offload", "deepspeed.zero_stage=2"]).deepspeed
    assert (ds.zero_stage, ds.precision) == (2, "bf16")


def test_template_named_in_a_recipe_yields_to_the_recipe_fields(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"deepspeed:\n  config_file: {DS_CONFIGS_DIR / 'zero2_fp16.json'}\n  precision: bf16\n")
    ds = load_config(str(path)).deepspeed
    assert (ds.zero_stage, ds.precision) == (2, "bf16")


def test_template_with_batch_keys_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="train_batch_size") as err:
        load_config("demo", [f"deepspeed.config_file={path}"])
    assert err.value.key == "deepspeed.config_file"


def test_deepspeed_accepts_every_template_and_precision():
    from deepspeed.runtime.config import DeepSpeedConfig  # imported here: heavy

    templates = sorted(DS_CONFIGS_DIR.glob("*.json"))
    assert len(templates) >= 12
    for template in templates:
        ds = build_ds_config(load_config("demo", [f"deepspeed.config_file={template}"]), 1)
        parsed = DeepSpeedConfig(ds)  # world size 1 without a process group
        assert parsed.gradient_clipping == 0.0
        assert parsed.zero_optimization_stage == json.loads(template.read_text())["zero_optimization"]["stage"]
        assert parsed.bfloat16_config.enabled == ("bf16" in template.name)
        assert parsed.float16_config.enabled == ("fp16" in template.name)


_INITIALIZE_SCRIPT = r"""
import json, os, sys
import torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
for name, config in json.load(open(sys.argv[1])):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dtype = next(engine.module.parameters()).dtype
    for _ in range(config["gradient_accumulation_steps"]):
        loss = engine(torch.randn(config["train_micro_batch_size_per_gpu"], 8, dtype=dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert engine.gradient_clipping() == 0.0, name
    print("ok", name, flush=True)
"""




def test_deepspeed_initialize_runs_a_step_with_every_stage_in_fp32_and_bf16(tmp_path):
    combos = [(stage, precision, False) for stage in range(4) for precision in ("fp32", "bf16")]
    combos += [(2, "bf16", True), (3, "bf16", True)]
    configs = []
    for stage, precision, offload in combos:
        cfg = load_config("demo", ["train.global_batch_size=8", "train.micro_batch_size=4",
                                   f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                   f"deepspeed.offload_optimizer={str(offload).lower()}"])
        configs.append((f"zero{stage}_{precision}{'_offload' if offload else ''}", build_ds_config(cfg, 1)))
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    (tmp_path / "run.py").write_text(_INITIALIZE_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "configs.json")],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")] == \
        [name for name, _ in configs]


# --------------------------------------------------------------------------- property

_KEYS = [row[0] for row in describe_fields()] + ["deepspeed.extra.zero_optimization.overlap_comm",
                                                 "deepspeed.extra.optimizer", "deepspeed.extra.bf16", "train"]
_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["0", "-1", "3", "2.5", "1e-3", ".inf", "-.nan", "null", "~", "true", "yes", "[1,40,40]",
                     "[1, -2]", "[]", "{a: 1}", "{type: Adam}", "2001-01-01", "!!binary aGk=", "!!set {a}",
                     "[[[[1]]]]", "'quoted'", "8192-8192-32768", "1-0", "[", "{", "&a [*a]", "10" * 40]),
)
_OVERRIDES = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(_KEYS), st.text(max_size=20)), _VALUES),
    st.text(max_size=40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(_OVERRIDES, min_size=1, max_size=3), world_size=st.integers(1, 4))
def test_any_override_either_loads_or_raises_config_error(overrides, world_size):
    try:
        cfg = load_config("demo", overrides)
        ds = build_ds_config(cfg, world_size)
    except ConfigError:
        return
    json.dumps(ds)  # a dict DeepSpeed can take
    assert ds["train_batch_size"] == cfg.train.global_batch_size


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_says_what_it_is_and_what_it_runs_on(recipe):
    description, runs_on = recipe_summary(recipe)
    assert len(description) > 10 and not description.startswith(recipe)
    assert "CPU" in runs_on or "GPU" in runs_on


def test_list_recipes_prints_each_with_its_description_and_hardware():
    proc = subprocess.run([sys.executable, "-m", "sfrik_scale.cli", "pretrain", "--list-recipes"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in list_recipes():
        description, runs_on = recipe_summary(name)
        assert f"{name}\n    {description}\n    runs on: {runs_on}" in proc.stdout
