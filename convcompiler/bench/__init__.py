"""Benchmarks (`python -m convcompiler.bench SUITE`). Never run by the test suite."""
