"""Benchmarks of the manager's cost: `python -m benchmarks` (see `benchmarks.manager_cost`)."""
