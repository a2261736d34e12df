"""One isolated call of the self-test: ``python -m sfrik_scale.selftest.worker --call MODULE:FUNCTION
--kwargs JSON --result FILE``.

The function runs in this fresh process (its CUDA context, allocator state and DeepSpeed
engine die with it) and must return a JSON-serialisable dict, written to ``--result``. It
may record partial results as it goes through :func:`record_partial` (``--result`` +
``.partial``), which the parent reads when the call times out or crashes.

Test hook: ``SFRIK_SELFTEST_FAULTS="KEY:raise,KEY:hang,KEY:exit,KEY:run"`` makes the call
whose ``--key`` is KEY raise, sleep forever, or exit with status 3 before its function runs,
so that tests can check that the runner records the failure and goes on; a part named in it
is run even where it would be skipped (``run``: only that), e.g. on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

FAULTS_ENV = "SFRIK_SELFTEST_FAULTS"
_PARTIAL_ENV = "SFRIK_SELFTEST_PARTIAL"


def faults() -> dict[str, str]:
    """KEY -> fault ("raise", "hang", "exit") from the test hook's environment variable."""
    out = {}
    for item in os.environ.get(FAULTS_ENV, "").split(","):
        if ":" in item:
            key, kind = item.split(":", 1)
            out[key.strip()] = kind.strip()
    return out


def inject_fault(key: str) -> None:
    kind = faults().get(key)
    if kind == "raise":
        raise RuntimeError(f"fault injected into {key} ({FAULTS_ENV})")
    if kind == "hang":
        while True:
            time.sleep(60)
    if kind == "exit":
        os._exit(3)


def record_partial(data: dict) -> None:
    """Save what the call has so far (replaced on every call); no-op outside a worker."""
    path = os.environ.get(_PARTIAL_ENV)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)


def resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--call", required=True, help="MODULE:FUNCTION")
    p.add_argument("--kwargs", default="{}", help="keyword arguments, JSON")
    p.add_argument("--result", required=True, help="JSON file for the returned dict")
    p.add_argument("--key", default="", help="name for the fault hook")
    args = p.parse_args(argv)
    os.environ[_PARTIAL_ENV] = args.result + ".partial"
    result: dict[str, Any]
    try:
        inject_fault(args.key)
        result = resolve(args.call)(**json.loads(args.kwargs))
        code = 0
    except Exception as err:  # the parent records it; the next call still runs
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        traceback.print_exc()
        code = 1
    Path(args.result).write_text(json.dumps(result, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
