"""What a loss module declares about itself, so that nothing else has to know it.

Every module of ``sfrik_scale.losses`` that defines a loss ends with ``SPEC = LossSpec(...)``.
The package registers every ``SPEC`` it finds (`sfrik_scale.losses.LOSSES`), and the rest of
the program derives what it needs from the specs: the ``loss`` section of the configuration
(one key per option, its type, help and checks; the defaults a run gets when a key is left
unset), ``--show-config``, the trainer and the memory simulator (`build_loss_from_config`),
the epoch summaries (the regulariser component) and the display names of tables and reports.

Adding a loss therefore takes one new module (the loss, its ``SPEC``), a recipe and a test.

Example:
    >>> SPEC = LossSpec(
    ...     name="my_loss", cls=MyLoss, display="Mine", summary="what it does, in a few words",
    ...     options=(Option("sim_coeff", float, 25.0, SIM_COEFF_HELP, minimum=0.0),),
    ...     regulariser="covariance")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..options import Option

__all__ = ["LossSpec", "Option", "SIM_COEFF_HELP", "MMD_COEFF_HELP", "CHUNK_SIZE_HELP"]

#: help of the options several losses share (each loss declares its own default)
SIM_COEFF_HELP = "Weight of the invariance term mean((z1 - z2)^2)."
MMD_COEFF_HELP = "Weight of the kernel regulariser."
CHUNK_SIZE_HELP = "Rows or columns per block of the loss's pairwise or covariance products (memory); None: from the sizes."


@dataclass(frozen=True)
class LossSpec:
    """A loss as the program sees it.

    name: the ``loss.name`` value; cls: the ``nn.Module`` class, built as ``cls(q=..., group=...,
    **options)``; display: the name tables and reports print ("SFRIK"); summary: a few words
    for help texts; options: its keyword arguments (`Option`); regulariser: the output
    component the epoch summaries show as "regulariser" (None: none).
    """

    name: str
    cls: type
    display: str
    summary: str
    options: Sequence[Option] = ()
    regulariser: Optional[str] = None

    def option(self, name: str) -> Optional[Option]:
        return next((o for o in self.options if o.name == name), None)

    def defaults(self) -> dict:
        """Options whose configuration default is set: {name: value}."""
        return {o.name: o.default for o in self.options if o.default is not None}
