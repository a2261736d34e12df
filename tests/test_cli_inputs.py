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

CLI_EXAMPLES = 400       # reported in the README
KEYS = [key for key, *_ in config.describe_fields()]
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


class _NoTraining:
    """Stands in for the Trainer: a valid config must not start a run in these tests."""

    def __init__(self, cfg, topo, hooks=()):
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


@settings(max_examples=CLI_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OVERRIDE, min_size=1, max_size=4))
def test_any_override_list_ends_in_success_or_one_clear_line(no_start, capsys, overrides):
    code = entry.main(overrides)
    _check_outcome(code, capsys.readouterr().err, overrides)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=30).filter(lambda s: not s.startswith("-")))
def test_any_config_name_ends_in_success_or_one_clear_line(no_start, capsys, name):
    code = entry.main(["--config", name])
    _check_outcome(code, capsys.readouterr().err, [name])


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
