"""Benchmarks that print numbers (run through `pyvirtio bench ...`)."""
