"""Benchmarks: each prints its ratios and writes JSON to bench/results/ (the full runs' JSON is committed, the --quick
runs' is not); bench/report.py writes docs/benchmarks.md from them."""
