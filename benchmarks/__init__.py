"""Benchmarks of peft-m2ist (see RESULTS.md)."""
