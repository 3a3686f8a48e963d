"""Benchmarks and reproductions (scripts; `bench.<name>` is importable for their tests)."""
