"""Memory simulation and planning, beside the command line: ``sfrik-scale profile-memory``
and ``sfrik-scale plan``. Builds models, losses and DeepSpeed configs on the meta device and
accounts for what each engine keeps (`simulate`, `engines`, `reference` for the official
code's path), sweeps and plans configurations (`sweep`, `plan`) and prints the tables
(`tables`, `paper`). Runtime profiling hooks are in `sfrik_scale.profiling`."""
