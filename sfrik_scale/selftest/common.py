"""Small helpers shared by the self-test's parts."""
from __future__ import annotations

import time
from typing import Optional

from ..planning.paper import PAPER_METHODS

#: the two losses of the paper's comparison, by their registered names
VICREG, SFRIK = PAPER_METHODS


class Deadline:
    """Seconds left of a part's time box, keeping a margin for writing its result."""

    def __init__(self, seconds: float, margin: float = 8.0) -> None:
        self.end = time.monotonic() + seconds - margin

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def gb(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value / 1e9, 3)


def rel_error(measured: Optional[float], simulated: Optional[float]) -> Optional[float]:
    if not measured or simulated is None:
        return None
    return round(100.0 * (simulated - measured) / measured, 1)
