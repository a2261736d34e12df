"""Test-side name for the package's local multi-rank spawner (see sfrik_scale.spawn)."""
from sfrik_scale.spawn import free_port, run_ranks  # noqa: F401
