"""Typed configuration: YAML recipe -> dataclasses -> dotted overrides, validated up front.

A run is described by one :class:`Config`, made of one dataclass per section
(``model``, ``loss``, ``data``, ``optim``, ``train``, ``deepspeed``, ``monitor``,
``profiling``). Every field carries its documentation in ``metadata["help"]``
(see :func:`describe_fields`). :func:`load_config` builds it in three layers:

1. the dataclass defaults (those of the built-in ``demo`` recipe, loss coefficients aside),
2. a YAML recipe, either a file or the name of a recipe shipped in
   ``sfrik_scale/recipes/`` (:func:`list_recipes`),
3. command-line overrides ``section.field=value``, values parsed as YAML
   (``train.epochs=3``, ``loss.coeffs=[1,40,40]``, ``data.path=/data/in1k/train``).

Everything that can be checked without knowing the world size is checked there;
:meth:`Config.validate` adds the batch-size arithmetic once the launcher has
decided how many processes there are. Every failure is a :class:`ConfigError`
(a ``ValueError``) whose message starts with the exact dotted key.

Example:
    >>> cfg = load_config("imagenet_sfrik_r50", ["data.path=/data/imagenet/train"]).validate(world_size=8)
    >>> cfg.model.embedding_dim, cfg.peak_lr
    (32768, 3.2)
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

import yaml

from sfrik_scale.config_schema import field_with_help as _f
from sfrik_scale.config_schema import loss_section, plugin_section, summaries
from sfrik_scale.config_types import accepts_str, coerce, type_name
from sfrik_scale.ds_config import check_extra, expand_ds_template
from sfrik_scale.errors import ConfigError
from sfrik_scale.errors import suggest as _suggest
from sfrik_scale.data.datasets import DATASETS, DEFAULT_DATASET, is_generated, reads_path
from sfrik_scale.data.pretrain import AUTO, LOADER_CHOICES
from sfrik_scale.data.transforms import AUGMENTATIONS
from sfrik_scale.losses import LOSS_SPECS, option_declarations
from sfrik_scale.optim import DEFAULT_OPTIMIZER, OPTIMIZERS

CONFIG_FILENAME = "config.yaml"
DEFAULT_RECIPE = "demo"
LR_REFERENCE_BATCH = 256  # lr = base_lr * global_batch_size / 256 (Goyal et al.; VICReg; SFRIK)


# --------------------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    """Backbone and projector (built by ``sfrik_scale.models``)."""

    backbone: str = _f("tiny_cnn", help=(
        "Backbone name: a model registered in sfrik_scale.models (e.g. tiny_cnn) or a torchvision "
        "classifier (resnet18, resnet50, ...) whose classification head is replaced by identity."))
    projector: str = _f("256-256-512", help=(
        "Projector widths 'h1-h2-...-q': Linear-BatchNorm-ReLU blocks, the last Linear without bias; "
        "the last width is the embedding dimension q (>= 2). The paper uses 8192-8192-32768 for ResNet-50."))
    sync_bn: bool = _f(True, help=(
        "Convert BatchNorm layers to SyncBatchNorm before deepspeed.initialize when several processes "
        "train on a device that supports it (CUDA); ignored with one process or on CPU."))
    channels_last: bool = _f(False, help=(
        "Give the views to the network in channels-last (NHWC) memory layout, as timm's --channels-last: "
        "the same maths in another order of summation (float rounding differs). Off by default; compare with "
        "`sfrik-scale bench step --config RECIPE model.channels_last=true` against =false on your machine."))

    @property
    def projector_widths(self) -> list[int]:
        """The projector spec as integers, e.g. [8192, 8192, 32768]."""
        return [int(w) for w in self.projector.split("-")]

    @property
    def embedding_dim(self) -> int:
        """q, the width of the projector's output."""
        return self.projector_widths[-1]


LossConfig = loss_section(default="sfrik")


@dataclass
class _DataConfig:
    """Dataset, two-view augmentations and loader."""

    dataset: Literal[tuple(DATASETS)] = _f(DEFAULT_DATASET, help=(  # type: ignore[valid-type]
        f"A sfrik_scale.data.DATASETS name. {summaries(DATASETS)}."))
    path: Optional[str] = _f(None, help=(
        "The image_folder root (e.g. /data/imagenet/train) or the file_list text file; required unless synthetic."))
    image_size: int = _f(32, help=(
        "Side of the square crops fed to the network (224 for ImageNet); also the size of synthetic images."))
    loader: Literal[LOADER_CHOICES] = _f(AUTO, help=(  # type: ignore[valid-type]
        "auto: DALI when nvidia-dali is installed and runs (checked once with a tiny CPU pipeline), else torchvision "
        "with a one-line notice; dali: DALI or a clear error; torchvision: DataLoader worker processes. DALI decodes "
        "and augments on the GPU (nvJPEG) when training on CUDA, on CPU threads otherwise; both loaders yield the "
        "same samples in the same order from the same view descriptions."))
    num_threads: int = _f(4, help="DALI CPU threads per rank (decoding and CPU augmentation); data.loader dali/auto.")
    num_workers: int = _f(1, help="Data-loading worker processes per rank (torchvision loader).")
    augmentations: Literal[tuple(AUGMENTATIONS)] = _f("small", help=(  # type: ignore[valid-type]
        f"Two-view augmentation set (a sfrik_scale.data AUGMENTATIONS name). {summaries(AUGMENTATIONS)}."))
    flip: Optional[bool] = _f(None, help=(
        "Horizontal flips of the views. null: the augmentation set's own, except on datasets whose mirror images "
        "are other classes (digits), where the views do not flip; true: flip with probability 0.5 on any dataset; "
        "false: never (a folder of letters or signs)."))


DataConfig = plugin_section(_DataConfig, DATASETS)


@dataclass
class _OptimConfig:
    """Optimiser and learning-rate schedule (``sfrik_scale.optim``), stepped per iteration."""

    name: Literal[tuple(OPTIMIZERS)] = _f(DEFAULT_OPTIMIZER, help=(  # type: ignore[valid-type]
        f"{summaries(OPTIMIZERS)}."))
    base_lr: float = _f(0.3, help="Learning rate per 256 images: peak lr = base_lr * train.global_batch_size / 256.")
    weight_decay: float = _f(1e-6, help="Weight decay (decoupled for adamw).")
    warmup_epochs: float = _f(1.0, help="Linear warm-up from 0 to the peak lr, in epochs (<= train.epochs).")
    final_lr_ratio: float = _f(0.001, help="The cosine decay ends at final_lr_ratio x peak lr, in [0, 1].")

    def peak_lr(self, global_batch_size: int) -> float:
        """base_lr x global_batch_size / 256."""
        return self.base_lr * global_batch_size / LR_REFERENCE_BATCH


OptimConfig = plugin_section(_OptimConfig, OPTIMIZERS)


@dataclass
class TrainConfig:
    """The loop: length, batch sizes, checkpoints, logging."""

    epochs: int = _f(10, help="Passes over the dataset.")
    global_batch_size: int = _f(256, help="Images per optimiser step, over all ranks and accumulation steps.")
    micro_batch_size: Optional[int] = _f(None, help=(
        "Images per rank per forward pass. None: global_batch_size / world_size (no gradient accumulation). "
        "With accumulation the kernel regulariser only sees micro_batch_size x world_size rows at a time, "
        "which changes SFRIK's objective: prefer accumulation 1."))
    seed: int = _f(0, help="Seed of parameters, data order, augmentations and the synthetic dataset.")
    run_dir: str = _f("runs/demo", help=(
        "Run directory: resolved config.yaml, TensorBoard events, checkpoints, summary.json."))
    resume: bool = _f(True, help="Resume from the latest complete checkpoint in run_dir when there is one.")
    on_damaged_checkpoint: Literal["fall_back", "stop"] = _f("fall_back", help=(
        "Resuming, a checkpoint whose files differ from the checksums in its COMPLETE marker, or that DeepSpeed "
        "cannot load: fall back to the newest checkpoint that verifies (the damaged one is kept, renamed "
        "damaged-stepN, and named in a warning) or stop with a one-line error."))
    checkpoint_every_steps: int = _f(200, help="Checkpoint every k optimiser steps (0: only at the end).")
    keep_last: int = _f(2, help="Number of most recent checkpoints kept in run_dir.")
    log_every_steps: int = _f(10, help="Optimiser steps between scalar logs (each log is a host sync).")
    max_steps: Optional[int] = _f(None, help="Stop after this many optimiser steps (smoke runs). None: epochs decide.")
    on_nonfinite: Literal["skip", "stop"] = _f("skip", help=(
        "A non-finite loss: skip the optimiser step (counted, logged, and described in nonfinite.jsonl) or stop "
        "with a diagnostic (nonfinite.json: which term, which rank, embedding statistics, step). Non-finite "
        "parameters always stop the run, and are never written over a checkpoint."))
    peer_timeout_s: float = _f(300.0, help=(
        "A rank whose heartbeat is older than this is taken as dead: the others name it and exit instead of "
        "waiting in a collective (a rank that raises is named within seconds)."))
    collective_timeout_s: float = _f(1800.0, help=(
        "Timeout of every collective of the process group (the backend's own bound on a hang)."))

    def micro_batch_size_for(self, world_size: int) -> int:
        """Per-rank micro-batch for ``world_size`` processes (call :meth:`Config.validate` first)."""
        return self.micro_batch_size if self.micro_batch_size is not None else self.global_batch_size // world_size

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """global_batch_size / (micro_batch_size x world_size)."""
        return self.global_batch_size // (self.micro_batch_size_for(world_size) * world_size)


@dataclass
class DeepSpeedSettings:
    """DeepSpeed engine options; ``sfrik_scale.ds_config.build_ds_config`` turns them into the ds_config dict."""

    zero_stage: Literal[0, 1, 2, 3] = _f(0, help=(
        "ZeRO stage: 0 (plain data parallel), 1 (partitions optimizer state), 2 (+ gradients), 3 (+ parameters)."))
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", help=(
        "Training precision. The loss's Gram and polynomials run in fp32 regardless. fp16 uses dynamic "
        "loss scaling and needs a GPU; CPU runs support fp32 and bf16."))
    offload_optimizer: bool = _f(False, help=(
        "Keep optimizer state on the CPU (ZeRO-Offload, pinned memory); needs zero_stage >= 1."))
    gradient_clipping: float = _f(0.0, help=(
        "Global gradient-norm clipping; 0.0 disables it. Always written to the ds_config because "
        "DeepSpeed's own default is 1.0 and the SSL recipes do not clip."))
    config_file: Optional[str] = _f(None, help=(
        "A ds_config JSON template to start from: a path, or a name in the repository's ds_configs/ "
        "(e.g. zero2_bf16). Resolved at load time: its stage, precision, offload and clipping become the "
        "defaults of the fields above, the rest goes under extra; the resolved config then sets this to None."))
    extra: Dict[str, Any] = _f(factory=dict, help=(
        "Further ds_config keys merged last (e.g. {zero_optimization: {overlap_comm: true}}). Keys owned by "
        "the fields above, the batch keys and optimizer/scheduler sections are refused."))


@dataclass
class MonitorConfig:
    """Rank-0 monitoring (``sfrik_scale.monitor``)."""

    tensorboard: bool = _f(True, help="Write TensorBoard scalars under run_dir.")
    progress: bool = _f(True, help="Show a rich progress bar per epoch and a summary table at the end.")


@dataclass
class OnlineEvalConfig:
    """Online evaluation during pretraining (``sfrik_scale.eval.online``): a linear head on the detached
    backbone features of the training batches and a weighted kNN monitor, scored on a held-out split."""

    enabled: bool = _f(False, help=(
        "Train the detached head and run the kNN monitor; logged under online/ in TensorBoard and summary.json."))
    every_epochs: int = _f(1, help="Epochs between online evaluations.")
    val_path: Optional[str] = _f(None, help=(
        "Held-out folder or file list for image_folder/file_list data (e.g. ImageNet val); synthetic and "
        "digits use their val split."))
    val_size: Optional[int] = _f(2000, help=(
        "Held-out images scored (per-class balanced subset; the synthetic val split's size). None: all."))
    bank_per_class: int = _f(50, help="Labelled training images per class in the kNN bank, re-encoded at each evaluation.")
    knn_k: int = _f(20, help="Neighbours of the kNN monitor.")
    knn_temperature: float = _f(0.07, help="T in the vote weights exp(similarity / T).")
    head_lr: float = _f(0.1, help="SGD lr of the online head (momentum 0.9, no weight decay).")
    batch_size: int = _f(256, help="Images per forward per rank when encoding the bank and held-out images.")


@dataclass
class ProfilingConfig:
    """Optional profiling (``sfrik_scale.profiling``)."""

    enabled: bool = _f(False, help=(
        "Record peak memory per phase of each step (data, backbone_forward, projector_forward, loss, "
        "backward, optimizer_step) and per module into run_dir/memory/ (JSON, CSV) and TensorBoard "
        "(memory/*). CUDA: the caching allocator's counters; CPU: exact tensor-byte accounting."))
    module_depth: int = _f(2, help=(
        "Per-module peaks for modules up to this depth in the model (1: backbone, projector; "
        "2: backbone.layer1, projector.0, ...); 0: only the backbone and projector forward phases."))
    memory_snapshot: bool = _f(False, help=(
        "CUDA only: record the allocator history (torch.cuda.memory._record_memory_history) and dump "
        "run_dir/memory/rank<r>_snapshot.pickle at the end, for https://pytorch.org/memory_viz."))
    snapshot_max_entries: int = _f(100000, help="Allocator events kept by memory_snapshot (a ring buffer).")

    def __post_init__(self) -> None:
        for name, low in (("module_depth", 0), ("snapshot_max_entries", 1)):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < low:
                raise ConfigError(f"profiling.{name}", f"must be >= {low}, got {value}")


@dataclass
class Config:
    """A complete run description. Build it with :func:`load_config`, which also fills the loss
    coefficients left at None from the loss's spec (``sfrik_scale.losses``) and expands ``deepspeed.config_file``."""

    model: ModelConfig = _f(factory=ModelConfig, help=ModelConfig.__doc__)
    loss: LossConfig = _f(factory=LossConfig, help=LossConfig.__doc__)
    data: DataConfig = _f(factory=DataConfig, help=DataConfig.__doc__)
    optim: OptimConfig = _f(factory=OptimConfig, help=OptimConfig.__doc__)
    train: TrainConfig = _f(factory=TrainConfig, help=TrainConfig.__doc__)
    deepspeed: DeepSpeedSettings = _f(factory=DeepSpeedSettings, help=DeepSpeedSettings.__doc__)
    monitor: MonitorConfig = _f(factory=MonitorConfig, help=MonitorConfig.__doc__)
    profiling: ProfilingConfig = _f(factory=ProfilingConfig, help=ProfilingConfig.__doc__)
    online_eval: OnlineEvalConfig = _f(factory=OnlineEvalConfig, help=OnlineEvalConfig.__doc__)

    @property
    def peak_lr(self) -> float:
        """optim.base_lr x train.global_batch_size / 256."""
        return self.optim.peak_lr(self.train.global_batch_size)

    def validate(self, world_size: int = 1) -> "Config":
        """Check everything, including the batch arithmetic for ``world_size`` processes; returns self."""
        _check_values(self)
        _check_world_size(self, world_size)
        return self

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _plain(dataclasses.asdict(self))

    def save(self, run_dir: Union[str, Path]) -> Path:
        """Write the resolved config to ``run_dir/config.yaml``; :func:`load_config` on it gives an equal Config."""
        path = Path(run_dir) / CONFIG_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        path.write_text("# Resolved sfrik-scale configuration; rerun with: --config " + str(path) + "\n" + text)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Config":
        """Read a saved ``config.yaml`` (or a run directory containing one)."""
        path = Path(path)
        return load_config(str(path / CONFIG_FILENAME if path.is_dir() else path))


SECTIONS: Dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# --------------------------------------------------------------------------- recipes

def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``sfrik_scale/recipes/``, sorted."""
    folder = resources.files("sfrik_scale").joinpath("recipes")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def recipe_summary(name: str) -> Tuple[str, str]:
    """(description, what it runs on) of a built-in recipe, from its comment header: the text
    after ``# NAME:`` on its first line, and its ``# Runs on:`` line."""
    header = [line[1:].strip() for line in recipe_text(name).splitlines() if line.startswith("#")]
    first = header[0] if header else ""
    description = first.split(":", 1)[1].strip() if first.startswith(f"{name}:") else first
    runs_on = next((line[len("Runs on:"):].strip() for line in header if line.startswith("Runs on:")), "")
    return description, runs_on


def recipe_text(name: str) -> str:
    """The YAML text of a built-in recipe (with its comment header)."""
    if name not in list_recipes():
        raise ConfigError("--config", f"unknown recipe {name!r}{_suggest(name, list_recipes())}; "
                                      f"built-in recipes: {', '.join(list_recipes())}")
    return resources.files("sfrik_scale").joinpath("recipes").joinpath(name + ".yaml").read_text()


def _read_source(source: str) -> Tuple[str, str]:
    """(YAML text, description) for a recipe name or a file path."""
    path = Path(source)
    if path.is_dir() and (path / CONFIG_FILENAME).is_file():
        path = path / CONFIG_FILENAME
    if path.is_file():
        return path.read_text(), str(path)
    if source in list_recipes():
        return recipe_text(source), f"recipe {source}"
    raise ConfigError("--config", f"{source!r} is neither a file nor a built-in recipe"
                                  f"{_suggest(source, list_recipes())}; built-in recipes: {', '.join(list_recipes())}")


# --------------------------------------------------------------------------- loading

def load_config(source: Optional[str] = None, overrides: Sequence[str] = (),
                world_size: Optional[int] = None) -> Config:
    """Build a validated Config from a recipe (name or YAML file; None: the demo) and dotted overrides.

    Args:
        source: a built-in recipe name (see :func:`list_recipes`), a YAML file, or a run directory.
        overrides: ``"section.field=value"`` strings; values are parsed as YAML
            (``train.epochs=3``, ``loss.coeffs=[1,40,40]``, ``deepspeed.extra.zero_optimization.overlap_comm=true``).
        world_size: when given, also run :meth:`Config.validate` for it.

    Raises:
        ConfigError: naming the dotted key of the first invalid value.
    """
    text, origin = _read_source(source or DEFAULT_RECIPE)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{origin} is not valid YAML: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError("--config", f"{origin} must hold a mapping of sections, got {type(raw).__name__}")

    # A ds_config template applies where it is named: under the recipe's own deepspeed fields
    # when the recipe names it, over the recipe (and under later overrides) when an override does.
    if isinstance(raw.get("deepspeed"), dict):
        raw["deepspeed"] = expand_ds_template(raw["deepspeed"], template_wins=False)
    for item in overrides:
        if _apply_override(raw, item) == "deepspeed.config_file":
            raw["deepspeed"] = expand_ds_template(raw["deepspeed"], template_wins=True)
    cfg = _build_config(raw)
    _resolve_loss_defaults(cfg)
    _check_values(cfg)
    if world_size is not None:
        _check_world_size(cfg, world_size)
    return cfg


def _apply_override(raw: Dict[str, Any], item: str) -> str:
    """Set one ``section.field=value`` in the raw nested dict; returns the dotted key."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(str(item), "an override must look like section.field=value")
    key, text = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or any(not p for p in parts):
        raise ConfigError(key or "(empty)", f"an override key must be section.field{_suggest(key, _all_keys())}")
    section, name = parts[0], parts[1]
    if section not in SECTIONS:
        raise ConfigError(key, f"unknown section {section!r}{_suggest(key, _all_keys())}; "
                               f"sections: {', '.join(SECTIONS)}")
    hints = typing.get_type_hints(SECTIONS[section])
    _known(name, hints, section + ".")
    if len(parts) > 2 and not (section == "deepspeed" and name == "extra"):
        raise ConfigError(key, f"{section}.{name} has no sub-keys")
    value = _parse_scalar(key, text)
    if accepts_str(hints[name]) and value is not None and not isinstance(value, str):
        value = text.strip()  # e.g. model.projector=2048-12-31 must not become a date
    if raw.get(section) is None:  # absent, or an empty "section:" line in the YAML
        raw[section] = {}
    node = raw[section]
    if not isinstance(node, dict):
        raise ConfigError(section, f"must be a mapping, got {type(node).__name__}")
    for part in parts[1:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value
    return key


def _parse_scalar(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError) as err:
        raise ConfigError(key, f"cannot parse value {text!r} as YAML ({type(err).__name__})") from None


def _build_config(raw: Mapping[str, Any]) -> Config:
    sections = {}
    for section, values in raw.items():
        _known(section, SECTIONS, "")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(section, f"must be a mapping of fields, got {type(values).__name__}")
        sections[section] = _build_section(SECTIONS[section], values, section)
    return Config(**sections)


def _build_section(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        _known(name, hints, prefix + ".")
        kwargs[name] = coerce(value, hints[name], f"{prefix}.{name}")
    return cls(**kwargs)


def _resolve_loss_defaults(cfg: Config) -> None:
    for name, value in LOSS_SPECS[cfg.loss.name].defaults().items():
        if getattr(cfg.loss, name) is None:
            setattr(cfg.loss, name, value)


# --------------------------------------------------------------------------- validation

_PROJECTOR_RE = re.compile(r"^[1-9][0-9]*(-[1-9][0-9]*)*$")


def _check_values(cfg: Config) -> None:
    """World-size independent checks, in section order."""
    m, lo, d, o, t, ds = cfg.model, cfg.loss, cfg.data, cfg.optim, cfg.train, cfg.deepspeed
    _require(bool(m.backbone.strip()), "model.backbone", "must not be empty")
    _require(bool(_PROJECTOR_RE.match(m.projector)), "model.projector",
             f"{m.projector!r} is not a spec of positive widths like '8192-8192-32768'")
    _require(m.embedding_dim >= 2, "model.projector", f"the last width q = {m.embedding_dim} must be >= 2")

    for name, declarations in option_declarations().items():  # each option's own checks (specs)
        own = [option for loss, option in declarations if loss == lo.name] or [declarations[0][1]]
        problem = own[0].problem(getattr(lo, name))
        _require(problem is None, f"loss.{name}", problem or "")

    _require(not reads_path(d.dataset) or bool(d.path), "data.path",
             f"required for dataset {d.dataset!r}: pass data.path=/path/to/images")
    _require(reads_path(d.dataset) or not d.path, "data.path",
             f"{d.path!r} is given but data.dataset={d.dataset!r} reads no path (it would be ignored); "
             "for a folder root/<class>/<image> add data.dataset=image_folder, for a list file data.dataset=file_list")
    for name, low in (("image_size", 8), ("num_workers", 0), ("num_threads", 1)):
        _require(getattr(d, name) >= low, f"data.{name}", f"must be >= {low}, got {getattr(d, name)}")
    _check_plugin_options(d, DATASETS, "data")

    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")  # before warmup_epochs, which reads it
    _require(o.base_lr > 0, "optim.base_lr", f"must be > 0, got {o.base_lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check_plugin_options(o, OPTIMIZERS, "optim")
    _require(0 <= o.warmup_epochs <= t.epochs, "optim.warmup_epochs",
             f"must be in [0, train.epochs = {t.epochs}], got {o.warmup_epochs}")
    _require(0 <= o.final_lr_ratio <= 1, "optim.final_lr_ratio", f"must be in [0, 1], got {o.final_lr_ratio}")

    for name, low in (("epochs", 1), ("global_batch_size", 1), ("seed", 0), ("checkpoint_every_steps", 0),
                      ("keep_last", 1), ("log_every_steps", 1)):
        _require(getattr(t, name) >= low, f"train.{name}", f"must be >= {low}, got {getattr(t, name)}")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    e = cfg.online_eval
    for name in ("every_epochs", "bank_per_class", "knn_k", "batch_size"):
        _require(getattr(e, name) >= 1, f"online_eval.{name}", f"must be >= 1, got {getattr(e, name)}")
    _require(e.val_size is None or e.val_size >= 1, "online_eval.val_size", f"must be None or >= 1, got {e.val_size}")
    for name in ("knn_temperature", "head_lr"):
        value = getattr(e, name)
        _require(math.isfinite(value) and value > 0, f"online_eval.{name}", f"must be > 0, got {value}")
    _require(not e.enabled or not reads_path(d.dataset) or bool(e.val_path),
             "online_eval.val_path", f"required with online_eval.enabled for dataset {d.dataset!r}")
    for name in ("peer_timeout_s", "collective_timeout_s"):
        value = getattr(t, name)
        _require(math.isfinite(value) and value > 0, f"train.{name}", f"must be a number of seconds > 0, got {value}")
    _require(bool(t.run_dir.strip()), "train.run_dir", "must not be empty")
    if t.micro_batch_size is not None:
        _require(t.micro_batch_size >= 1, "train.micro_batch_size", f"must be >= 1, got {t.micro_batch_size}")
        _require(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
                 f"{t.global_batch_size} is not divisible by train.micro_batch_size = {t.micro_batch_size}")

    _require(ds.gradient_clipping >= 0, "deepspeed.gradient_clipping", f"must be >= 0, got {ds.gradient_clipping}")
    _require(not ds.offload_optimizer or ds.zero_stage >= 1, "deepspeed.offload_optimizer",
             "needs deepspeed.zero_stage >= 1 (ZeRO-Offload)")
    _require(ds.config_file is None, "deepspeed.config_file",
             "templates are expanded by load_config; build the Config with load_config(..., overrides)")

    check_extra(ds.extra)


def _check_plugin_options(section: Any, registry: Any, prefix: str) -> None:
    """The checks each option of a registry's entries declares (`sfrik_scale.options.Option`)."""
    for name, declarations in registry.option_declarations().items():
        problem = declarations[0][1].problem(getattr(section, name))
        _require(problem is None, f"{prefix}.{name}", problem or "")


def _check_world_size(cfg: Config, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("world_size", f"must be a positive integer, got {world_size!r}")
    t = cfg.train
    if world_size > t.global_batch_size:
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is smaller than the world size "
                                                     f"{world_size}: every rank needs at least one image a step")
    micro = t.micro_batch_size_for(world_size)
    per_step = micro * world_size
    if t.micro_batch_size is None and t.global_batch_size % world_size:
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not divisible by the world size "
                                                     f"{world_size} (train.micro_batch_size is null: one "
                                                     "micro-batch of global / world_size images per rank)")
    if micro < 1 or t.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size", f"{t.global_batch_size} is not divisible by "
                                                     f"train.micro_batch_size x world_size = {micro} x {world_size}")
    if is_generated(cfg.data.dataset) and cfg.data.synthetic_size < t.global_batch_size:
        raise ConfigError("data.synthetic_size", f"{cfg.data.synthetic_size} images make no full batch of "
                                                 f"train.global_batch_size = {t.global_batch_size}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


# --------------------------------------------------------------------------- helpers

def _known(name: Any, known: Mapping[str, Any], prefix: str) -> None:
    if name not in known:
        where = f"section {prefix[:-1]!r}" if prefix else "the config"
        raise ConfigError(f"{prefix}{name}", f"unknown key in {where}{_suggest(str(name), list(known), prefix)}; "
                                             f"known: {', '.join(known)}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_fields() -> list[Tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) for every field, e.g. for ``sfrik-scale pretrain --help``."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{section}.{f.name}", type_name(hints[f.name]), _plain(default), f.metadata["help"]))
    return rows
