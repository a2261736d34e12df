"""Help text for the terminal: module docstrings shown by ``--help`` without their markup."""
from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")  # :class:`~a.b.C` -> C, :func:`f` -> f
_LITERAL = re.compile(r"``([^`]+)``")        # ``x`` -> x
_REFERENCE = re.compile(r"(?<![`\w])`([^`]+)`(?!`)")  # `name` -> name


def plain(doc: str) -> str:
    """``doc`` without reStructuredText roles and literals, ready for ``argparse``'s description."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc)
    return _REFERENCE.sub(r"\1", _LITERAL.sub(r"\1", text))
