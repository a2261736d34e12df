"""The package's structure (docs/architecture.md): no import cycle, imports only point down the
layers, one error handler and one free_port. Read from the source with `ast`, nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sfrik_scale"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return mods


MODULES = _modules()


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement of ``module`` loads (relative imports resolved;
    ``from pkg import sub`` counts as importing pkg.sub when sub is a module)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if MODULES[module].name != "__init__.py":
                base = base[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
    return [n for n in names if n in MODULES and n not in ("sfrik_scale", module)]


def _import_graph() -> dict[str, set[str]]:
    """Every import of every module, at module level or inside functions (a deferred import is
    still a dependency), except under ``if TYPE_CHECKING:``."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree)
                       if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                       for n in ast.walk(block)}
        graph[module] = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                         and id(n) not in typing_only for t in _targets(module, n)}
    return graph


GRAPH = _import_graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == f"sfrik_scale.{p}" or module.startswith(f"sfrik_scale.{p}.") for p in prefixes)


#: (modules, what they must not import): the layer rules of docs/architecture.md
LAYER_RULES = [
    # the building blocks never read the run configuration nor know who drives them
    (("kernels", "fused", "comm", "gram", "losses", "models", "optim", "data", "learning_health", "health", "topology"),
     ("config", "ds_config", "train", "pretrain", "eval", "planning", "cli", "benchmarks", "selftest")),
    # the trainer is driven from above: evaluation plugs in through hooks, planning sits beside it
    (("train",), ("eval", "planning", "cli", "pretrain", "benchmarks", "selftest")),
    # the self-test drives everything and nothing drives it but the command line
    (("kernels", "fused", "comm", "gram", "losses", "models", "optim", "data", "config", "ds_config", "train", "eval",
      "profiling", "planning", "checkpoint", "export", "pretrain", "benchmarks"), ("selftest",)),
    # runtime profiling sits below the trainer; simulation and planning beside the command line
    (("profiling",), ("planning", "train", "pretrain", "cli", "eval")),
    # storage, checkpoints, the monitor, the leaf modules and the trainer's collaborators know no model or config
    (("errors", "helptext", "registry", "storage", "hooks", "checkpoint", "elastic", "monitor", "checkpoint_policy",
      "preemption", "epoch_tally", "nonfinite"),
     ("config", "models", "train", "eval", "planning", "cli", "pretrain")),
    # nothing below the command line imports it
    (("kernels", "fused", "comm", "gram", "losses", "models", "optim", "data", "config", "ds_config", "train", "eval",
      "profiling", "planning", "checkpoint", "export", "pretrain", "benchmarks", "selftest"), ("cli",)),
]


@pytest.mark.parametrize("sources,forbidden", LAYER_RULES, ids=lambda x: "+".join(x[:3]))
def test_imports_point_down_the_layers(sources, forbidden):
    wrong = {m: sorted(t for t in GRAPH[m] if _under(t, forbidden)) for m in GRAPH if _under(m, sources)}
    assert {m: t for m, t in wrong.items() if t} == {}


def _definitions(name: str) -> list[str]:
    return [m for m, path in MODULES.items()
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]


def test_one_free_port_and_one_error_handler():
    assert _definitions("free_port") == ["sfrik_scale.topology"]
    assert _definitions("_free_port") == []
    assert _definitions("run_command") == ["sfrik_scale.errors"]
    assert _definitions("one_line") == ["sfrik_scale.errors"]
    entry_points = ("sfrik_scale.cli", "sfrik_scale.pretrain", "sfrik_scale.eval.cli")
    for module in entry_points:
        assert "run_command(" in MODULES[module].read_text(), module
    # no other place maps exceptions to the bad-input exit status
    for module, path in MODULES.items():
        if module != "sfrik_scale.errors":
            assert "return 2\n" not in path.read_text().replace("return 2 *", ""), module


def test_commands_are_registered_by_explicit_imports():
    text = MODULES["sfrik_scale.cli"].read_text()
    assert "importlib" not in text and "import_module" not in text


#: files that may spell a loss's name, and why (everything else derives names from the specs)
LOSS_NAME_ALLOWED = {
    "config.py": "the default of loss.name",
    "data/__init__.py": "the default augmentation preset, named after a method",
    "data/transforms.py": "augmentation presets named after methods",
    "benchmarks/data.py": "the default augmentation preset, named after a method",
    "planning/paper.py": "the paper's published figures, per method",
    "planning/reference.py": "the reconstruction of the official code's memory path",
    "planning/tables.py": "the paper's VICReg / SFRIK ratio columns",
    "planning/cli.py": "the presets that reproduce the paper's memory table",
    "planning/simulate.py": "the paper's scenario as the simulator's default",
}


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_loss_names_are_spelled_only_by_their_own_module():
    """A loss is known to the rest of the program through its spec: no other module of the
    package names it in code (docstrings and the allow-list above aside)."""
    from sfrik_scale.losses import LOSS_SPECS

    names, found = set(LOSS_SPECS), []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in LOSS_NAME_ALLOWED or (rel.startswith("losses/") and path.stem in names):
            continue
        found += [f"{rel}:{node.lineno}: {node.value!r}" for node in _string_constants(ast.parse(path.read_text()))
                  if node.value in names]
    assert found == []
    assert {"sfrik", "vicreg", "simclr", "align_uniform", "contrastive"} <= names


#: files that may spell a data backend's name ("torchvision", "dali"), and why
BACKEND_NAME_ALLOWED = {
    "data/pretrain.py": "the backends' own module: their names and the choice between them",
    "selftest/__init__.py": "the self-test part named after the DALI library (its key, not a backend choice)",
    "selftest/runner.py": "the DALI library's version in the self-test's environment record",
}

#: files that may spell a dataset's name, and why (everything else asks data.datasets)
DATASET_NAME_ALLOWED = {
    "data/datasets.py": "the dataset registry: each factory, its options, the default",
}

#: files that may spell an optimiser's name, and why (everything else asks optim)
OPTIMIZER_NAME_ALLOWED = {
    "optim.py": "the optimiser registry: each builder, the default",
}


def _names_spelled_outside(names: set, allowed: dict) -> list[str]:
    """``file:line: 'name'`` for each string constant of the package (docstrings aside) that is one
    of ``names``, outside the ``allowed`` files."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in allowed:
            found += [f"{rel}:{node.lineno}: {node.value!r}" for node in _string_constants(ast.parse(path.read_text()))
                      if node.value in names]
    return found


def test_data_backend_names_are_spelled_only_by_their_own_module():
    """`data.pretrain` names the loader backends; the configuration, the benchmarks and the
    self-test take the names from it."""
    from sfrik_scale.data.pretrain import BACKENDS

    assert set(BACKENDS) == {"torchvision", "dali"}
    assert _names_spelled_outside(set(BACKENDS), BACKEND_NAME_ALLOWED) == []


def test_dataset_names_are_spelled_only_by_the_registry():
    """The configuration, the evaluations and the benchmarks ask `data.datasets` (the default,
    `reads_path`, `path_option`, `is_generated`) instead of naming a dataset."""
    from sfrik_scale.data import DATASETS

    assert {"synthetic", "digits", "image_folder", "file_list"} <= set(DATASETS)
    assert _names_spelled_outside(set(DATASETS), DATASET_NAME_ALLOWED) == []


def test_optimizer_names_are_spelled_only_by_the_registry():
    """The configuration, the benchmarks and the memory simulator take the default and each
    optimiser's options and state from `optim`."""
    from sfrik_scale.optim import OPTIMIZERS

    assert {"lars", "lamb", "adamw"} <= set(OPTIMIZERS)
    assert _names_spelled_outside(set(OPTIMIZERS), OPTIMIZER_NAME_ALLOWED) == []


def test_every_loss_spec_is_complete_and_builds_with_its_defaults():
    from sfrik_scale.config import load_config
    from sfrik_scale.losses import LOSS_SPECS, LOSSES, build_loss_from_config, loss_parameters

    for name, spec in LOSS_SPECS.items():
        assert LOSSES.get(name) is spec.cls and spec.display and spec.summary
        assert {o.name for o in spec.options} <= set(loss_parameters(name)), name  # every option is a keyword
        cfg = load_config(None, [f"loss.name={name}"] + [f"loss.{k}=null" for k in spec.defaults()])  # unset
        assert {k: getattr(cfg.loss, k) for k in spec.defaults()} == spec.defaults()
        loss = build_loss_from_config(cfg.loss, q=16)
        assert isinstance(loss, spec.cls)


def test_the_module_table_names_every_module():
    """docs/architecture.md's "who owns what" table covers every module and package."""
    table = (ROOT / "docs" / "architecture.md").read_text().split("### Who owns what")[1].split("###")[0]
    named = {name for row in table.splitlines() if row.startswith("| `") for name in
             [part.strip(" `") for part in row.split("|")[1].split(",")]}
    modules = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and not p.name.startswith("__"))}
    assert modules - named == set()
