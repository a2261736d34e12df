"""The one place that turns a :class:`~sfrik_scale.config.Config` into a DeepSpeed config dict.

The trainer passes the dict as ``deepspeed.initialize(model=..., optimizer=..., lr_scheduler=...,
config=build_ds_config(cfg, world_size))``. Two DeepSpeed rules shape it:

* Pass the dict through ``config=`` only: do not also put ``--deepspeed_config`` in the
  ``args`` given to ``deepspeed.initialize`` (DeepSpeed asserts when it gets both).
* No ``optimizer`` or ``scheduler`` section: the trainer hands its own LARS/AdamW/LAMB and LR
  schedule objects to ``deepspeed.initialize`` (DeepSpeed refuses a client optimizer together
  with a config optimizer). ``zero_allow_untested_optimizer`` is therefore set (ZeRO otherwise
  refuses client optimizers) and ``zero_force_ds_cpu_optimizer`` is cleared (ZeRO-Offload
  otherwise insists on DeepSpeedCPUAdam).

``gradient_clipping`` is always written: DeepSpeed defaults it to 1.0, and the SSL recipes
do not clip (0.0).

This module also owns the knowledge of which ds_config keys mirror Config fields: the JSON
templates of ds_configs/ (``deepspeed.config_file``) are folded into the config by
``load_config`` through :func:`expand_ds_template`, and :func:`check_extra` refuses
``deepspeed.extra`` keys that would contradict a field.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from sfrik_scale.errors import ConfigError
from sfrik_scale.errors import short as _short
from sfrik_scale.errors import suggest as _suggest

DS_CONFIG_FILENAME = "ds_config.json"
STEPS_PER_PRINT_NEVER = 1_000_000_000  # DeepSpeed's own periodic prints stay off; sfrik_scale.monitor logs

# Where ``deepspeed.config_file=NAME`` looks when NAME is not an existing path:
# the repository's ds_configs/ next to the package (present in a source checkout).
DS_CONFIGS_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Dynamic loss scaling for fp16 (DeepSpeed's documented defaults, spelled out so the run
# directory records them); tune through deepspeed.extra.fp16.*.
FP16_DYNAMIC_LOSS_SCALING: Dict[str, Any] = {
    "loss_scale": 0,  # 0 = dynamic
    "initial_scale_power": 16,  # initial scale 2^16
    "loss_scale_window": 1000,  # raise the scale after this many overflow-free steps
    "hysteresis": 2,  # overflows tolerated before lowering the scale
    "min_loss_scale": 1,
}

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_FORBIDDEN = ("optimizer", "scheduler")
_SECTIONS = ("zero_optimization", "bf16", "bfloat16", "fp16")  # mappings in the built dict
# ds_config key path -> the Config key that owns it.
_OWNED = {
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("zero_optimization", "offload_optimizer"): "deepspeed.offload_optimizer",
    ("bf16", "enabled"): "deepspeed.precision",
    ("bfloat16", "enabled"): "deepspeed.precision",
    ("fp16", "enabled"): "deepspeed.precision",
    ("gradient_clipping",): "deepspeed.gradient_clipping",
}


# --------------------------------------------------------------------------- the builder

def build_ds_config(cfg: Any, world_size: int) -> Dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` (a `sfrik_scale.config.Config`) trained by ``world_size``
    data-parallel processes.

    Batch keys satisfy train_batch_size = train_micro_batch_size_per_gpu x
    gradient_accumulation_steps x world_size (checked; ConfigError naming the keys otherwise);
    ``cfg.deepspeed.extra`` is merged last. A ds_configs/ template given as
    ``deepspeed.config_file`` was already folded into ``cfg.deepspeed`` by ``load_config``.

    Example:
        >>> from sfrik_scale.config import load_config
        >>> cfg = load_config("imagenet_sfrik_r50", ["data.path=/data/in1k/train"])
        >>> build_ds_config(cfg, world_size=8)["train_micro_batch_size_per_gpu"]
        256
    """
    cfg.validate(world_size)
    train, ds = cfg.train, cfg.deepspeed
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    fp16: Dict[str, Any] = {"enabled": ds.precision == "fp16"}
    if ds.precision == "fp16":
        fp16.update(FP16_DYNAMIC_LOSS_SCALING)
    config: Dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size_for(world_size),
        "gradient_accumulation_steps": train.gradient_accumulation_steps(world_size),
        "gradient_clipping": float(ds.gradient_clipping),
        "steps_per_print": STEPS_PER_PRINT_NEVER,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": fp16,
    }
    deep_merge(config, ds.extra)
    check_batch_keys(config, world_size)
    return config


def check_batch_keys(ds_config: Mapping[str, Any], world_size: int) -> None:
    """Raise ConfigError unless train_batch_size == micro x gradient_accumulation_steps x world_size."""
    try:
        batch = ds_config["train_batch_size"]
        micro = ds_config["train_micro_batch_size_per_gpu"]
        accumulation = ds_config["gradient_accumulation_steps"]
    except KeyError as missing:
        raise ConfigError(str(missing.args[0]), "missing from the ds_config") from None
    if batch != micro * accumulation * world_size:
        raise ConfigError("train_batch_size", (
            f"train_batch_size ({batch}) != train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accumulation}) x world_size ({world_size})"))


def save_ds_config(ds_config: Mapping[str, Any], run_dir: Union[str, Path]) -> Path:
    """Write the dict to ``run_dir/ds_config.json`` (for the record; the trainer still passes the dict)."""
    path = Path(run_dir) / DS_CONFIG_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds_config, indent=2) + "\n")
    return path


def deep_merge(base: Dict[str, Any], top: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated recursively with a copy of ``top`` (top wins); returns base."""
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


# --------------------------------------------------------------------------- templates and extra

def owner_of(path: Tuple[str, ...]) -> Optional[str]:
    """The Config key owning ds_config key ``path`` (e.g. ('zero_optimization', 'stage')), else None."""
    if path and path[0] in _BATCH_KEYS:
        return "train.global_batch_size / train.micro_batch_size"
    return _OWNED.get(tuple(path))


def check_extra(extra: Mapping[str, Any], path: Tuple[str, ...] = ()) -> None:
    """Refuse ``deepspeed.extra`` keys that a Config field owns, optimizer/scheduler, non-mapping sections."""
    for k, v in extra.items():
        sub = path + (k,)
        key = "deepspeed.extra." + ".".join(sub)
        if not path and k in _FORBIDDEN:
            raise ConfigError(key, "the trainer passes its own optimizer and LR schedule to deepspeed.initialize "
                                   "(DeepSpeed refuses both): use optim.* instead")
        owner = owner_of(sub)
        if owner is not None:
            raise ConfigError(key, f"set {owner} instead (one source of truth)")
        if not path and k in _SECTIONS and not isinstance(v, dict):
            raise ConfigError(key, f"must be a mapping of {k} options, got {type(v).__name__} {_short(v)}")
        if isinstance(v, dict):
            check_extra(v, sub)


def resolve_ds_template(name: str) -> Path:
    """Path of a ds_config template: an existing path, or NAME[.json] in the repository's ds_configs/."""
    for candidate in (Path(name), DS_CONFIGS_DIR / name, DS_CONFIGS_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DS_CONFIGS_DIR.glob("*.json")) if DS_CONFIGS_DIR.is_dir() else []
    raise ConfigError("deepspeed.config_file", f"no file {name!r}{_suggest(name, known)}; "
                                               f"templates in {DS_CONFIGS_DIR}: {', '.join(known) or '(none)'}")


def expand_ds_template(values: Dict[str, Any], template_wins: bool) -> Dict[str, Any]:
    """Fold ``values["config_file"]`` into ``values``, the raw ``deepspeed`` section of a config.

    The template's stage, precision, offload and clipping set the matching fields and every
    other key goes under ``extra``; with ``template_wins`` False the fields and extra keys already
    in ``values`` take precedence (a recipe naming a template), with True the template's do (a
    command-line override naming one). ``config_file`` becomes None, so that the resolved
    config is self-contained. Sections without ``config_file`` are returned unchanged.
    """
    name = values.get("config_file")
    if name is None:
        return values
    key = "deepspeed.config_file"
    if not isinstance(name, str):
        raise ConfigError(key, f"expected a file name, got {type(name).__name__}")
    path = resolve_ds_template(name)
    try:
        template = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(key, f"{path} is not valid JSON: {err}") from None
    if not isinstance(template, dict):
        raise ConfigError(key, f"{path} must hold a JSON object")
    for bad in _BATCH_KEYS + _FORBIDDEN:
        if bad in template:
            raise ConfigError(key, f"{path} sets {bad!r}; batch keys come from train.* and the trainer passes its "
                                   "own optimizer and LR schedule: remove it from the template")
    derived: Dict[str, Any] = {"precision": "fp32"}
    zero = template.get("zero_optimization")
    if isinstance(zero, dict):
        if "stage" in zero:
            derived["zero_stage"] = zero.pop("stage")
        offload = zero.pop("offload_optimizer", None)
        if isinstance(offload, dict):
            derived["offload_optimizer"] = offload.get("device", "none") in ("cpu", "nvme")
    for section, precision in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16")):
        sub = template.get(section)
        if isinstance(sub, dict) and sub.pop("enabled", False) is True:
            derived["precision"] = precision
    if "gradient_clipping" in template:
        derived["gradient_clipping"] = template.pop("gradient_clipping")
    extra = values.get("extra") or {}
    if not isinstance(extra, dict):
        raise ConfigError("deepspeed.extra", f"expected a mapping, got {type(extra).__name__}")
    own = {k: v for k, v in values.items() if k not in ("config_file", "extra")}
    if template_wins:
        resolved = {**own, **derived, "extra": deep_merge(copy.deepcopy(extra), template)}
    else:
        resolved = {**derived, **own, "extra": deep_merge(template, extra)}
    resolved["config_file"] = None
    return resolved
