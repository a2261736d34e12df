"""Property-based tests: whatever a user types, the CLI answers with one clear line naming the
key and exit status 2, never a traceback from inside DeepSpeed, DALI or our own code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sfrik_scale import cli, config
from sfrik_scale import pretrain as entry

from .test_config import BAD_OVERRIDES

# Reported in the README: generated inputs that are invalid by construction, each asserted
# to end in one stderr line and exit status 2.
INVALID_OVERRIDE_LISTS = 400
INVALID_CONFIG_NAMES = 60
ANY_OVERRIDE_LISTS = 200  # any input, valid or not: success or one line (not counted as invalid)
KEYS = [key for key, *_ in config.describe_fields()]
TYPES = {key: type_name for key, type_name, *_ in config.describe_fields()}
SECTIONS = sorted({key.split(".")[0] for key in KEYS})
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "null", "true", "[1,-40]", "[]", "{a: 1}", "8192-x", "0", "-1", "1e400", "nan",
                     "sfrik", "dali", "bf16", "fp16", "[1,40,40]", "resnet18", "'", ": :", "\x00"]),
    st.text(max_size=12),
)
OVERRIDE = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),                # known key, odd value
    st.builds(lambda k, v: f"{k}={v}", st.text(min_size=1, max_size=15).filter(lambda s: "=" not in s), VALUES),
    st.text(max_size=20).filter(lambda s: "=" not in s and not s.startswith("-")),     # no '=' at all
)


# ---- inputs that are invalid whatever else is on the command line (the oracle is the
# construction, not the code under test). "x" + letters is never a YAML keyword, number,
# recipe, choice or field name.
_WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", max_size=8).map(lambda s: "x" + s)
# A quoted numeral is no integer, but a number key reads it as one: PyYAML reads 1e-6 (no dot)
# as a string, so number keys convert strings that spell a number (config_types.coerce).
_NOT_A_NUMBER = st.one_of(_WORD, st.sampled_from(["[1]", "[]", "{a: 1}", "[1, 2]"]))
_BAD_BY_TYPE = {
    "an integer": st.one_of(_NOT_A_NUMBER, st.sampled_from(["2.5", "true", "null", "-0.5", "'3'"])),
    "an integer or null": st.one_of(_NOT_A_NUMBER, st.sampled_from(["2.5", "true", "'3'"])),
    "a number": st.one_of(_NOT_A_NUMBER, st.sampled_from(["true", "null"])),
    "a number or null": st.one_of(_NOT_A_NUMBER, st.just("true")),
    "true or false": st.one_of(_WORD, st.sampled_from(["2", "0.5", "[]", "{a: 1}", "null"])),
    "a list of numbers": st.one_of(_WORD, st.sampled_from(["[a]", "{a: 1}", "[[1]]", "[true]"])),
    "a list of 2 numbers": st.one_of(_WORD, st.sampled_from(["[1]", "[1, 2, 3]", "[a, b]", "{a: 1}"])),
}
_TYPED_KEYS = sorted(k for k, t in TYPES.items() if t in _BAD_BY_TYPE or t.startswith("one of"))


def _bad_value(key: str):
    type_name = TYPES[key]
    if type_name.startswith("one of"):  # a choice: a word that is none of them, or a number/list
        return st.one_of(_WORD, st.sampled_from(["-1", "4", "[]", "{a: 1}"]))
    return _BAD_BY_TYPE[type_name]


INVALID_OVERRIDE = st.one_of(
    # a value of the wrong type (or outside the choices) for a known key
    st.sampled_from(_TYPED_KEYS).flatmap(lambda k: st.tuples(st.just(k), _bad_value(k))
                                         .map(lambda kv: (kv[0], f"{kv[0]}={kv[1]}"))),
    # an unknown field of a known section
    st.tuples(st.sampled_from(SECTIONS), _WORD).map(lambda sw: (f"{sw[0]}.{sw[1]}", f"{sw[0]}.{sw[1]}=1")),
    # an unknown section
    st.tuples(_WORD, st.sampled_from([k.split(".")[1] for k in KEYS]), VALUES)
    .map(lambda t: (f"{t[0]}.{t[1]}", f"{t[0]}.{t[1]}={t[2]}")),
    # no "=" at all (not an option either)
    st.text(max_size=20).filter(lambda s: "=" not in s and not s.startswith("-")).map(lambda s: (None, s)),
)


@st.composite
def invalid_override_lists(draw):
    """(the invalid override's key or None, the list): one invalid override among up to 3
    arbitrary ones, none of which sets the same key (that could replace the bad value)."""
    key, bad = draw(INVALID_OVERRIDE)
    others = draw(st.lists(OVERRIDE.filter(lambda o: key is None or o.split("=", 1)[0].strip() != key),
                           max_size=3))
    at = draw(st.integers(0, len(others)))
    return key, others[:at] + [bad] + others[at:]


def _is_a_config_source(name: str) -> bool:
    path = Path(name)
    return name in config.list_recipes() or path.is_file() or (path / "config.yaml").is_file()


class _NoTraining:
    """Stands in for the Trainer: a valid config must not start a run in these tests."""

    def __init__(self, cfg, topo, hooks=(), **kwargs):  # the Trainer's keywords (stop, ...) too
        pass

    def run(self) -> int:
        return 0


@pytest.fixture
def no_start(monkeypatch):
    import sfrik_scale.topology as topology
    import sfrik_scale.train as train

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    monkeypatch.setattr(topology, "init_distributed", lambda *a, **k: None)
    monkeypatch.setattr(train, "Trainer", _NoTraining)


def _check_outcome(code: int, err: str, args: list[str]) -> None:
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in err, (args, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sfrik-scale pretrain: error:"), (args, err)


def _check_one_line_exit_2(code: int, err: str, args: list[str]) -> str:
    assert code == 2, (args, code, err)
    _check_outcome(code, err, args)
    return err


@settings(max_examples=INVALID_OVERRIDE_LISTS, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(invalid_override_lists())
def test_every_invalid_override_list_ends_in_one_line_and_exit_2(no_start, capsys, case):
    key, overrides = case
    err = _check_one_line_exit_2(entry.main(overrides), capsys.readouterr().err, overrides)
    if key is not None and len(overrides) == 1:  # alone, the bad key is the one named
        assert key in err, (overrides, err)


@settings(max_examples=INVALID_CONFIG_NAMES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=30).filter(lambda s: not s.startswith("-") and not _is_a_config_source(s)))
def test_every_config_name_that_is_no_recipe_or_file_ends_in_one_line_and_exit_2(no_start, capsys, name):
    err = _check_one_line_exit_2(entry.main(["--config", name]), capsys.readouterr().err, [name])
    assert "--config" in err


@settings(max_examples=ANY_OVERRIDE_LISTS, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OVERRIDE, min_size=1, max_size=4))
def test_any_override_list_ends_in_success_or_one_clear_line(no_start, capsys, overrides):
    code = entry.main(overrides)
    _check_outcome(code, capsys.readouterr().err, overrides)


@pytest.mark.parametrize("override, key", [
    ("loss.name=barlow", "loss.name"), ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("data.loader=ffcv", "data.loader"), ("train.global_batch_size=0", "train.global_batch_size"),
    ("model.projector=", "model.projector"), ("optim.base_lr=-1", "optim.base_lr"),
    ("loss.coeffs=[]", "loss.coeffs"), ("train.peer_timeout_s=0", "train.peer_timeout_s"),
])
def test_each_bad_value_names_its_key(no_start, capsys, override, key):
    assert entry.main([override]) == 2
    assert key in capsys.readouterr().err


def test_invalid_cli_input_through_the_console_script(capsys):
    for argv in (["pretrain", "--config"], ["bench", "nosuch"], ["export"], ["nosuchcommand"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    assert cli.main(["export", "/definitely/not/a/run"]) == 2
    assert "not a pretraining run directory" in capsys.readouterr().err


def test_missing_dataset_folder_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    from sfrik_scale.config import load_config
    from sfrik_scale.topology import Topology
    from sfrik_scale.train import Trainer

    cfg = load_config(None, ["data.dataset=image_folder", f"data.path={tmp_path / 'nope'}",
                             f"train.run_dir={tmp_path / 'run'}"]).validate(1)
    trainer = Trainer(cfg, Topology(0, 1, 0, __import__("torch").device("cpu"), "single"))
    with pytest.raises((ValueError, FileNotFoundError), match="nope"):
        trainer.build_data()
    assert not Path(tmp_path / "run").exists()


def _options_without_help(parser, prefix=()):
    import argparse

    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _options_without_help(sub, (*prefix, name))
        elif action.help is None and not isinstance(action, argparse._HelpAction):
            missing.append(" ".join((*prefix, *(action.option_strings or [action.dest]))))
    return missing


def test_every_option_of_every_command_has_help():
    assert _options_without_help(cli.build_parser()) == []


def test_plan_with_a_negative_memory_budget_names_the_flag(capsys):
    assert cli.main(["plan", "--memory-gb", "-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sfrik-scale plan: error: --memory-gb must be a positive number of GB, got -5"


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1, got 0"),
    (["--q", "1", "8192"], "--q must be >= 2, got 1"),
])
def test_profile_memory_refuses_impossible_sizes_before_any_run(capsys, tmp_path, args, message):
    assert cli.main(["profile-memory", "--simulate", "--out", str(tmp_path / "m"), *args]) == 2
    assert capsys.readouterr().err.strip() == f"sfrik-scale profile-memory: error: {message}"
    assert not (tmp_path / "m").exists()


def test_show_config_lists_every_key_with_the_recipes_value(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    assert cli.main(["pretrain", "--show-config", "--config", "small_sfrik", "train.epochs=7"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line.split("│")[3].strip() for line in out.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert set(rows) == {key for key, *_ in config.describe_fields()}
    assert rows["model.backbone"] == "'small_resnet'" and rows["train.epochs"] == "7"


def test_deepspeed_does_not_warn_about_a_missing_accelerator_on_a_cpu_machine(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: DeepSpeed picks it and has nothing to warn about")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    code = ("from sfrik_scale.cli import main; main(['pretrain', '--list-recipes']); "
            "import deepspeed.comm; print('imported')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr
    assert "Setting accelerator to CPU" not in proc.stderr + proc.stdout


def test_the_readme_reports_these_counts():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = " ".join(readme.split())
    assert f"{INVALID_OVERRIDE_LISTS} generated override lists" in text
    assert f"{INVALID_CONFIG_NAMES} generated `--config` names" in text
    assert f"{len(BAD_OVERRIDES)} hand-written bad overrides" in text
