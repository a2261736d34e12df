"""Evaluation commands: ``linear-eval``, ``knn-eval``, ``finetune``, ``svm-eval``, ``report``.

    sfrik-scale linear-eval runs/demo                        # frozen features + logistic regression (<= 64 px)
    sfrik-scale linear-eval runs/in1k --protocol sgd        # augmented SGD probe, 100 epochs (> 64 px default)
    sfrik-scale knn-eval runs/demo --k 10 20 100 200
    sfrik-scale linear-eval runs/demo --raw-pixels           # baselines: the flattened input,
    sfrik-scale linear-eval runs/demo --random-init          # the architecture with random weights,
    sfrik-scale supervised runs/demo                         # and the same backbone trained with labels
    sfrik-scale finetune runs/demo --label-fraction 0.01    # semi-supervised, 1 % recipe
    sfrik-scale linear-eval runs/in1k --dataset image_folder --train-data /data/places205/train \\
        --val-data /data/places205/val --benchmark places205  # transfer
    sfrik-scale svm-eval runs/in1k --voc-root /data/VOCdevkit/VOC2007
    sfrik-scale report runs/*

Several processes (data parallel; see each module's "Distributed" paragraph)::

    deepspeed --num_gpus 8 --module sfrik_scale.eval.cli linear-eval runs/in1k ...
    torchrun --nproc_per_node 8 -m sfrik_scale.eval.cli linear-eval runs/in1k ...

A SOURCE is a pretraining run directory (latest complete checkpoint, or --tag), an export
directory (backbone.pt + export.json) or a backbone.pt file; --random-init evaluates its
architecture with random weights. Data options default to the pretraining run's data.
Results go to OUT/result.json (default OUT: SOURCE/eval/<command>-<benchmark>[-<subset>]).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import run_command
from ..helptext import plain
from ..topology import quiet_cpu_accelerator

COMMANDS = ("linear-eval", "knn-eval", "finetune", "supervised", "svm-eval", "report")


# ----------------------------------------------------------------------------------------
# Argument groups
# ----------------------------------------------------------------------------------------
def _source_args(p: argparse.ArgumentParser, raw_pixels: bool = False, random_init: bool = True) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("source", help="pretraining run directory, export directory, or backbone.pt")
    g.add_argument("--tag", default=None, help="checkpoint tag of a run (default: the latest complete one)")
    g.add_argument("--backbone", default=None, help="architecture name, when the source does not say")
    if not random_init:
        return
    g.add_argument("--random-init", action="store_true",
                   help="ignore the weights: a randomly initialised backbone of the same architecture (baseline)")
    if raw_pixels:
        g.add_argument("--raw-pixels", action="store_true",
                       help="no network: the flattened input image at the evaluation resolution (baseline)")


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (defaults: the pretraining run's)")
    g.add_argument("--dataset", default=None,
                   help="synthetic, digits, image_folder (ImageNet/Places205 layout root/<class>/<image>), file_list")
    g.add_argument("--train-data", default=None, help="image_folder root or file_list of the training split")
    g.add_argument("--val-data", default=None, help="image_folder root or file_list of the validation split")
    g.add_argument("--image-size", type=int, default=None, help="crop side (default: the run's, else 224)")
    g.add_argument("--num-classes", type=int, default=None, help="synthetic: classes")
    g.add_argument("--synthetic-size", type=int, default=None, help="synthetic: train images")
    g.add_argument("--synthetic-val-size", type=int, default=1000, help="synthetic: val images (1000)")
    g.add_argument("--data-seed", type=int, default=None, help="synthetic: generation seed (default: the run's)")
    g.add_argument("--benchmark", default=None, help="short name of the benchmark in results and reports")


def _subset_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("labelled subset (default: all labels)")
    g.add_argument("--label-fraction", type=float, default=None,
                   help="keep this fraction of each class's images (0.01, 0.1), chosen deterministically")
    g.add_argument("--images-per-class", type=int, default=None, help="keep this many images of each class")
    g.add_argument("--subset-file", default=None,
                   help="a list of image names (SimCLR's 1percent.txt / 10percent.txt format)")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the generated subset (0)")


def default_workers() -> int:
    """4 data-loading workers, or fewer when this process may use fewer CPUs (no oversubscription warning)."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus))


def _runtime_args(p: argparse.ArgumentParser, batch_help: str = "global batch size (256)") -> None:
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: SOURCE/eval/<command>-<benchmark>...)")
    g.add_argument("--batch-size", type=int, default=256, help=batch_help)
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loading workers per process (default: 4, at most the CPUs this process may use)")
    g.add_argument("--seed", type=int, default=0, help="seed of the head, shuffling and augmentations (0)")
    g.add_argument("--no-resume", dest="resume", action="store_false", help="start over, ignoring saved state")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", help="no TensorBoard events")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _classifier_args(p: argparse.ArgumentParser, epochs: int, weight_decay: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs ({epochs})")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help=f"weight decay ({weight_decay:g})")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="RandomResizedCrop area range of the training crops (0.08 1.0; 0.5 1.0 up to 64 px)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every k epochs, and after the last (1)")
    g.add_argument("--eval-batch-size", type=int, default=256, help="validation batch per process (256)")


def add_commands(subparsers) -> None:
    fmt = argparse.HelpFormatter
    lin = subparsers.add_parser("linear-eval", help="linear probe on a frozen backbone (also transfer)",
                                description=_doc("linear"), formatter_class=fmt)
    _source_args(lin, raw_pixels=True)
    _data_args(lin)
    _subset_args(lin)
    g = lin.add_argument_group("protocol")
    g.add_argument("--protocol", choices=("features", "sgd"), default=None,
                   help="features: frozen features once + logistic regression with validated C (default up to "
                        "64 px); sgd: augmented SGD training of a linear head (default above)")
    g.add_argument("--Cs", type=float, nargs="+", default=None, metavar="C",
                   help="features: inverse L2 strengths tried (default 0.001 0.01 0.1 1 10 100)")
    g.add_argument("--holdout", type=float, default=None,
                   help="features: fraction of the training images that chooses C (0.2)")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="features: do not cache the features in OUT/cache")
    _classifier_args(lin, epochs=100, weight_decay=1e-6)
    lin.add_argument("--lr", type=float, default=0.4, help="sgd: head learning rate (0.4; VICReg's recipe: 0.02)")
    _runtime_args(lin)
    lin.set_defaults(handler=main_linear)

    knn = subparsers.add_parser("knn-eval", help="weighted kNN on frozen features",
                                description=_doc("knn"), formatter_class=fmt)
    _source_args(knn, raw_pixels=True)
    _data_args(knn)
    _subset_args(knn)
    knn.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbour counts (10 20 100 200)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (0.07)")
    knn.add_argument("--no-cache", dest="cache", action="store_false", help="do not cache the features in OUT/cache")
    _runtime_args(knn, batch_help="encoding batch per process (256)")
    knn.set_defaults(handler=main_knn)

    ft = subparsers.add_parser("finetune", help="semi-supervised fine-tuning (1 %% / 10 %% labels)",
                               description=_doc("finetune"), formatter_class=fmt)
    _source_args(ft)
    _data_args(ft)
    _subset_args(ft)
    _classifier_args(ft, epochs=20, weight_decay=0.0)
    ft.add_argument("--backbone-lr", type=float, default=None,
                    help="backbone lr (default: 0.004 with <= 3 %% of the labels, else 0.02)")
    ft.add_argument("--head-lr", type=float, default=None,
                    help="head lr (default: 1.0 with <= 3 %% of the labels, else 0.1)")
    _runtime_args(ft)
    ft.set_defaults(handler=main_finetune)

    sup = subparsers.add_parser("supervised", help="the upper bound: the same backbone trained with all labels",
                                description=_doc("supervised"), formatter_class=fmt)
    _source_args(sup, random_init=False)
    _data_args(sup)
    _subset_args(sup)
    _classifier_args(sup, epochs=SUPERVISED_EPOCHS, weight_decay=SUPERVISED_WEIGHT_DECAY)
    sup.add_argument("--lr", type=float, default=SUPERVISED_LR,
                     help=f"learning rate of the backbone and the head ({SUPERVISED_LR:g})")
    _runtime_args(sup, batch_help=f"global batch size ({SUPERVISED_BATCH})")
    sup.set_defaults(handler=main_supervised, random_init=True, batch_size=SUPERVISED_BATCH)

    svm = subparsers.add_parser("svm-eval", help="VOC07-style per-class linear SVMs on frozen features (mAP)",
                                description=_doc("svm"), formatter_class=fmt)
    _source_args(svm)
    g = svm.add_argument_group("data")
    g.add_argument("--voc-root", default=None, help="a VOC devkit folder (VOCdevkit/VOC2007)")
    g.add_argument("--train-list", default=None, help="multi-label list of the training split (see docs)")
    g.add_argument("--test-list", default=None, help="multi-label list of the test split")
    g.add_argument("--root", default=None, help="folder the listed paths are relative to (default: the list's)")
    g.add_argument("--train-set", default="trainval", help="VOC image set for training (trainval)")
    g.add_argument("--test-set", default="test", help="VOC image set for testing (test)")
    g.add_argument("--image-size", type=int, default=None, help="crop side (default: the run's, else 224)")
    g.add_argument("--benchmark", default="voc07", help="name in results and reports (voc07)")
    g = svm.add_argument_group("protocol")
    g.add_argument("--costs", default=None,
                   help="comma-separated SVM costs (default: 1e-7..100 by decades and 0.5^4..0.5^19)")
    g.add_argument("--folds", type=int, default=3, help="cross-validation folds choosing the cost per class (3)")
    g.add_argument("--ap", choices=("standard", "11point"), default="standard",
                   help="AP definition: all-point interpolated (standard) or VOC2007 11-point")
    _runtime_args(svm, batch_help="encoding batch per process (256)")
    svm.set_defaults(handler=main_svm)

    rep = subparsers.add_parser("report", help="comparison table of evaluation results (Markdown + rich)",
                                description=_doc("report"), formatter_class=fmt)
    rep.add_argument("paths", nargs="+", help="result.json files, their folders, or run directories")
    rep.add_argument("--out", default=None, help="also write the Markdown table to this file")
    rep.add_argument("--metric", choices=("best", "last"), default="best", help="best or last-epoch accuracy")
    rep.add_argument("--merge-seeds", action="store_true",
                     help="one row per configuration: mean ± sd over runs that differ only by their seed")
    rep.add_argument("--transpose", action="store_true", help="methods as columns, metrics as rows (the paper's layout)")
    rep.set_defaults(handler=main_report)


#: The supervised upper bound's recipe: SGD momentum 0.9, cosine per epoch (docs/evaluation.md: on
#: digits batch 64 / lr 0.05 / 50 epochs gave 98.9 % top-1, batch 256 / lr 0.1 97.7 %, batch 64 / lr 0.1 /
#: 100 epochs 98.0 %).
SUPERVISED_EPOCHS, SUPERVISED_LR, SUPERVISED_WEIGHT_DECAY, SUPERVISED_BATCH = 50, 0.05, 5e-4, 64

_DESCRIPTIONS = {
    "linear": "Linear probe on the frozen backbone. --protocol features (the default up to 64 px): features "
              "extracted once (eval transform, cached), a multinomial logistic regression on standardised features "
              "whose C is chosen on 20 % of the training images, refitted on all; seconds on a CPU. --protocol sgd "
              "(the default above 64 px): a linear head N(0, 0.01) trained with SGD momentum 0.9, cosine, batch "
              "256, lr 0.4, wd 1e-6, 100 epochs on augmented crops. --raw-pixels / --random-init give the "
              "baselines. Data parallel; top-1/top-5 in OUT/result.json. See docs/evaluation.md.",
    "supervised": "The supervised upper bound of the comparison table: the source's backbone architecture, "
                  "randomly initialised, trained end to end with a linear head on all training labels (SGD "
                  "momentum 0.9, cosine, batch 64, lr 0.05, wd 5e-4, 50 epochs, the classifiers' crops and flips; "
                  "no flips on digits). "
                  "Top-1/top-5 on the val split in OUT/result.json (kind 'supervised').",
    "finetune": "Semi-supervised fine-tuning: the pretrained backbone (train mode) and a linear head N(0, 0.01) "
                "trained end to end on a labelled subset (--label-fraction, --images-per-class or "
                "--subset-file): 20 epochs, batch 256, wd 0, cosine; backbone/head lr 0.004/1.0 up to 3 % of the "
                "labels, 0.02/0.1 above. Data parallel over processes; resumable from OUT/checkpoint.pt; "
                "top-1/top-5 last and best in OUT/result.json. See docs/evaluation.md.",
    "knn": "Weighted kNN on L2-normalised frozen features (votes exp(sim / T), T = 0.07, k in 10 20 100 200); "
           "the bank stays sharded over processes. Features cached in OUT/cache. See docs/evaluation.md.",
    "svm": "VOC07 protocol: per-class linear SVMs (LinearSVC) on L2-normalised frozen features, cost chosen per "
           "class by 3-fold cross-validated AP over a sweep, test mAP (standard all-point AP or VOC07 11-point). "
           "Data: --voc-root VOCdevkit/VOC2007, or --train-list/--test-list in the multi-label list format "
           "(lines 'path v1 ... vC', values 1 present / -1 absent / 0 difficult). See docs/evaluation.md.",
    "report": "Collect result.json files (or folders holding them, e.g. run directories) into the comparison table "
              "(method, q, L, epochs, linear top-1/top-5, kNN, semi-supervised, transfer); Markdown on stdout, "
              "a rich table on stderr. Baselines (raw pixels, random init, supervised) come last; --merge-seeds "
              "gives mean ± sd over seeds, --transpose the paper's layout (methods as columns).",
}


def _doc(name: str) -> str:
    return _DESCRIPTIONS[name]


# ----------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------
def _source(args):
    from .source import resolve_source

    return resolve_source(args.source, tag=args.tag, backbone=args.backbone, random_init=args.random_init,
                          raw_pixels=getattr(args, "raw_pixels", False))


def _data_spec(args, pretrain: dict):
    from ..data.datasets import DEFAULT_DATASET
    from .data import EvalDataSpec

    dataset = args.dataset or pretrain.get("dataset") or DEFAULT_DATASET
    same = dataset == pretrain.get("dataset")
    spec = EvalDataSpec(
        dataset=dataset,
        train_path=args.train_data or (pretrain.get("path") if same else None),
        val_path=args.val_data,
        image_size=args.image_size or pretrain.get("image_size") or 224,
        num_classes=args.num_classes or (pretrain.get("num_classes") if same else None) or 10,
        synthetic_size=args.synthetic_size or (pretrain.get("synthetic_size") if same else None) or 4096,
        synthetic_val_size=args.synthetic_val_size,
        seed=args.data_seed if args.data_seed is not None else (pretrain.get("seed") or 0) if same else 0)
    for name in ("image_size", "num_classes", "synthetic_size", "synthetic_val_size"):
        if getattr(spec, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(spec, name)}")
    return spec


def _subset(args):
    from .subsets import LabelSubset

    return LabelSubset(fraction=args.label_fraction, per_class=args.images_per_class, file=args.subset_file,
                       seed=args.subset_seed)


def _subset_tag(subset) -> Optional[str]:
    if subset.fraction is not None:
        return f"{100 * subset.fraction:g}pct"
    if subset.per_class is not None:
        return f"{subset.per_class}perclass"
    if subset.file is not None:
        return Path(subset.file).stem
    return None


def _setup(kind: str, args, need_val: bool = True, header: tuple = (), out_kind: Optional[str] = None):
    from .common import default_out_dir, eval_topology
    from .session import prepare

    source = _source(args)
    spec = _data_spec(args, source.pretrain)
    subset = _subset(args)
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    benchmark = args.benchmark or spec.benchmark_name()
    baseline = "pixels" if getattr(args, "raw_pixels", False) else \
        "random" if args.random_init and kind != "supervised" else None
    extra = "-".join(x for x in (_subset_tag(subset), baseline) if x) or None
    out = Path(args.out) if args.out else default_out_dir(args.source, out_kind or kind, benchmark, extra)
    topo = eval_topology(args.local_rank)
    return prepare(kind, source, spec, out, topo, subset=subset, seed=args.seed, progress=args.progress,
                   tensorboard=args.tensorboard, benchmark=benchmark, need_val=need_val, header=header)


def _image_size(args) -> int:
    """The evaluation image size before the source is opened: --image-size, else the run's, else 224."""
    if args.image_size:
        return args.image_size
    return _source(args).pretrain.get("image_size") or 224


def _crop_scale(args, image_size: int) -> tuple:
    from .data import default_crop_scale

    return tuple(args.crop_scale) if args.crop_scale is not None else default_crop_scale(image_size)


def main_linear(args, extra: Sequence[str] = ()) -> int:
    from ..data.transforms import SMALL_IMAGE_SIZE

    image_size = _image_size(args)
    protocol = args.protocol or ("features" if image_size <= SMALL_IMAGE_SIZE else "sgd")
    if protocol == "features":
        return _linear_features(args)
    if args.Cs is not None or args.holdout is not None:
        raise ValueError("--Cs and --holdout belong to --protocol features")
    from .classifier import ClassifierHParams, ClassifierTraining

    hp = ClassifierHParams(epochs=args.epochs, head_lr=args.lr, weight_decay=args.weight_decay, finetune=False,
                           batch_size=args.batch_size, momentum=args.momentum,
                           crop_scale=_crop_scale(args, image_size), seed=args.seed, eval_every=args.eval_every,
                           eval_batch_size=args.eval_batch_size, num_workers=args.workers)
    hp.check(1)
    setup = _setup("linear", args, header=(("recipe", f"SGD probe: {hp.epochs} epochs, batch {hp.batch_size}, "
                                                      f"lr {hp.head_lr:g}, wd {hp.weight_decay:g}, SGD momentum "
                                                      f"{hp.momentum:g}, cosine, crops {list(hp.crop_scale)}"),))
    ClassifierTraining(setup, hp, resume=args.resume).run()
    return 0


def _linear_features(args) -> int:
    from .probe import DEFAULT_CS, DEFAULT_HOLDOUT, run_feature_probe

    Cs = args.Cs if args.Cs is not None else list(DEFAULT_CS)
    holdout = args.holdout if args.holdout is not None else DEFAULT_HOLDOUT
    if min(Cs) <= 0 or not 0 < holdout < 1 or args.batch_size < 1:
        raise ValueError(f"--Cs must be > 0 (got {Cs}), --holdout in (0, 1) (got {holdout}), --batch-size >= 1")
    setup = _setup("linear", args, out_kind="linear-features",
                   header=(("recipe", f"frozen features + logistic regression, C from {min(Cs):g} to {max(Cs):g} "
                                      f"chosen on {holdout:.0%} of the training images"),))
    run_feature_probe(setup, batch_size=args.batch_size, num_workers=args.workers, cache=args.cache and args.resume,
                      Cs=Cs, holdout=holdout, seed=args.seed)
    return 0


def main_supervised(args, extra: Sequence[str] = ()) -> int:
    from .classifier import ClassifierHParams, ClassifierTraining

    image_size = _image_size(args)
    hp = ClassifierHParams(epochs=args.epochs, finetune=True, weight_decay=args.weight_decay, backbone_lr=args.lr,
                           head_lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
                           crop_scale=_crop_scale(args, image_size), seed=args.seed, eval_every=args.eval_every,
                           eval_batch_size=args.eval_batch_size, num_workers=args.workers)
    hp.check(1)
    setup = _setup("supervised", args, header=(("recipe", f"supervised from scratch: {hp.epochs} epochs, batch "
                                                          f"{hp.batch_size}, lr {hp.head_lr:g}, wd {hp.weight_decay:g}, "
                                                          f"crops {list(hp.crop_scale)}"),))
    ClassifierTraining(setup, hp, resume=args.resume, kind="supervised").run()
    return 0


def main_finetune(args, extra: Sequence[str] = ()) -> int:
    from .classifier import ClassifierHParams, ClassifierTraining, finetune_learning_rates

    setup = _setup("finetune", args)
    backbone_lr, head_lr = finetune_learning_rates(setup.data["labelled_fraction"])
    hp = ClassifierHParams(epochs=args.epochs, finetune=True, weight_decay=args.weight_decay,
                           backbone_lr=args.backbone_lr if args.backbone_lr is not None else backbone_lr,
                           head_lr=args.head_lr if args.head_lr is not None else head_lr,
                           batch_size=args.batch_size, momentum=args.momentum,
                           crop_scale=_crop_scale(args, setup.spec.image_size), seed=args.seed,
                           eval_every=args.eval_every, eval_batch_size=args.eval_batch_size, num_workers=args.workers)
    setup.monitor.print(f"recipe: {hp.epochs} epochs, batch {hp.batch_size}, backbone lr {hp.backbone_lr:g}, "
                        f"head lr {hp.head_lr:g}, wd {hp.weight_decay:g}, SGD momentum {hp.momentum:g}, cosine")
    ClassifierTraining(setup, hp, resume=args.resume).run()
    return 0


def main_knn(args, extra: Sequence[str] = ()) -> int:
    from .knn import run_knn_eval

    if min(args.k) < 1 or args.temperature <= 0 or args.batch_size < 1:
        raise ValueError("--k values and --batch-size must be >= 1 and --temperature > 0")
    setup = _setup("knn", args, header=(("kNN", f"k in {args.k}, T = {args.temperature:g}, cosine similarity"),))
    run_knn_eval(setup, ks=args.k, temperature=args.temperature, batch_size=args.batch_size,
                 num_workers=args.workers, cache=args.cache and args.resume)
    return 0


def main_svm(args, extra: Sequence[str] = ()) -> int:
    from .common import default_out_dir, eval_topology
    from .multilabel import read_multilabel_list, read_voc_devkit
    from .svm import DEFAULT_COSTS, run_svm_eval

    if args.voc_root and (args.train_list or args.test_list):
        raise ValueError("give either --voc-root or --train-list/--test-list")
    if args.voc_root:
        train, test = read_voc_devkit(args.voc_root, args.train_set), read_voc_devkit(args.voc_root, args.test_set)
    elif args.train_list and args.test_list:
        train, test = read_multilabel_list(args.train_list, args.root), read_multilabel_list(args.test_list, args.root)
    else:
        raise ValueError("svm-eval needs --voc-root, or both --train-list and --test-list")
    try:
        costs = [float(c) for c in args.costs.split(",")] if args.costs else list(DEFAULT_COSTS)
    except ValueError:
        raise ValueError(f"--costs must be comma-separated numbers, got {args.costs!r}") from None
    if args.folds < 2:
        raise ValueError(f"--folds must be >= 2, got {args.folds}")
    source = _source(args)
    out = Path(args.out) if args.out else default_out_dir(args.source, "svm", args.benchmark,
                                                          "random" if args.random_init else None)
    topo = eval_topology(args.local_rank)
    run_svm_eval(topo, source, train, test, out, image_size=args.image_size or source.pretrain.get("image_size") or 224,
                 costs=costs, folds=args.folds, ap=args.ap, batch_size=args.batch_size, num_workers=args.workers,
                 seed=args.seed, benchmark=args.benchmark, progress=args.progress, tensorboard=args.tensorboard,
                 resume=args.resume)
    return 0


def main_report(args, extra: Sequence[str] = ()) -> int:
    from .report import report

    print(report(args.paths, out=args.out, metric=args.metric, merge_seeds=args.merge_seeds,
                 transposed=args.transpose), end="")
    return 0


# ----------------------------------------------------------------------------------------
# python -m sfrik_scale.eval.cli (the deepspeed launcher passes --local_rank before the command)
# ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sfrik_scale.eval.cli", description=plain(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", dest="launcher_local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "local_rank", None) is None and args.launcher_local_rank is not None:
        args.local_rank = args.launcher_local_rank
    quiet_cpu_accelerator()
    return run_command(args.command, lambda: args.handler(args, ()))

if __name__ == "__main__":
    sys.exit(main())
