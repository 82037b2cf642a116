"""Benchmarks: each prints its ratios and writes JSON to bench/results/ (not committed)."""
