"""How the configuration's sections are made from what the plugins declare.

``config.py`` lists the sections; the keys that belong to one loss, optimiser or dataset
are not written there but generated here from the plugin's declarations
(`sfrik_scale.options.Option`): the ``loss`` section from the losses' specs
(`loss_section`), and ``optim`` and ``data`` from the options each optimiser and dataset
declares when it is registered (`plugin_section`). Every field carries its help in
``metadata["help"]`` (`field_with_help`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

from sfrik_scale.losses import LOSS_SPECS, option_declarations

#: the module the generated sections live in (pickling finds them there)
CONFIG_MODULE = "sfrik_scale.config"


def field_with_help(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose documentation lives in ``metadata["help"]``."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def summaries(registry: Any) -> str:
    """"name: summary; name: summary" over a registry's entries, for a help text."""
    return "; ".join(f"{name}: {registry.summary(name)}" if registry.summary(name) else name for name in registry)


def _loss_option_help(declarations: list) -> str:
    """One option's help: its declaring losses' help, and each loss's default."""
    helps = list(dict.fromkeys(option.help for _, option in declarations))
    defaults = [f"{loss} {option.default:g}" if isinstance(option.default, float) else f"{loss} {option.default}"
                for loss, option in declarations if option.default is not None]
    used = ", ".join(loss for loss, _ in declarations)
    tail = (f" None: the loss's default ({', '.join(defaults)})." if defaults
            else " None: chosen from the sizes.")
    return " ".join(helps) + f" Used by {used}." + tail


def loss_section(default: str) -> type:
    """The ``loss`` section, derived from the losses' specs (`sfrik_scale.losses.spec`): ``name``
    (``default`` when a run names none) and one field per option any loss declares, None by default. A run's loss options left at
    None are filled from its loss's spec (so the resolved config shows the numbers that ran);
    fields the loss does not take are ignored."""
    loss_name = Literal[tuple(LOSS_SPECS)]  # type: ignore[valid-type]  # every registered loss
    fields = [("name", loss_name, field_with_help(default, help=", ".join(
        f"{spec.name} ({spec.summary})" for spec in LOSS_SPECS.values()) + "."))]
    for name, declarations in option_declarations().items():
        types = {repr(option.type) for _, option in declarations}
        if len(types) > 1:
            raise TypeError(f"losses declare option {name!r} with different types: {sorted(types)}")
        fields.append((name, Optional[declarations[0][1].type],
                       field_with_help(None, help=_loss_option_help(declarations))))
    return dataclasses.make_dataclass("LossConfig", fields, namespace={"__doc__": (
        "The self-supervised loss (``sfrik_scale.losses``); fields a loss does not use are ignored."),
        "__module__": CONFIG_MODULE, "__qualname__": "LossConfig"})


def plugin_section(common: type, registry: Any) -> type:
    """A section: the dataclass ``common`` (the keys every entry of ``registry`` shares; its name
    with the leading underscore dropped names the section's class) followed by one key per
    option the registry's entries declare, with the declared type, default and help, and the
    entries that use it. Entries that share an option must declare it alike."""
    fields = []
    for name, declarations in registry.option_declarations().items():
        first = declarations[0][1]
        if any((o.type, o.default) != (first.type, first.default) for _, o in declarations):
            raise TypeError(f"{registry.kind} entries declare option {name!r} with different types or defaults")
        used = ", ".join(entry for entry, _ in declarations)
        fields.append((name, first.type, field_with_help(
            first.default, help=f"{first.help} Used by {registry.kind} {used}.")))
    name = common.__name__.lstrip("_")
    return dataclasses.make_dataclass(name, fields, bases=(common,), namespace={
        "__doc__": common.__doc__, "__module__": CONFIG_MODULE, "__qualname__": name})
