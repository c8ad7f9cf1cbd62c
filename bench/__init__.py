"""Benchmarks: print a table and write JSON under bench/results/. Ratios are measured side by side in one run."""
