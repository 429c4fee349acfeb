"""Benchmarks (`python -m convcompiler.bench SUITE`) and the prepared GPU check
(`python -m convcompiler.bench gpu`). The test suite runs only the GPU check's --dry-run."""
