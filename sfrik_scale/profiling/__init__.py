"""Memory profiling: tensor-byte tracking on any device, and (issue 5) simulation and planning."""
