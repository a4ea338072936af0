"""Benchmarks that print numbers (nothing in them asserts a time): `speed` (one guided
iteration: seconds, memory, FLOPs; scripts/benchmark.py) and `toy` (the toy world, where the
truth is known: fidelity and attribute agreement; scripts/toy_benchmark.py)."""
