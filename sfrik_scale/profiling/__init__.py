"""Runtime memory profiling, below the trainer: tensor-byte accounting on any device
(`accounting`, `tracker`), the phase markers of a step (`phases`) and the profiler that
records them per rank (`step`). Simulation and planning live in `sfrik_scale.planning`."""
