"""`make bench` / `make bench-quick`: every benchmark in turn (each prints its ratios and writes JSON), then the report
of them all (docs/benchmarks.md; --quick: bench/results/benchmarks_quick.md)."""

from __future__ import annotations

import argparse
import sys

from bench import discover, export_speed, fragility, generate, keep, masked_forward, report, scaleout, step_cost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny models only (minutes)")
    quick = ap.parse_args(argv).quick
    flag = ["--quick"] if quick else []
    for bench in (step_cost, masked_forward, export_speed, generate, keep, fragility, discover, scaleout):
        print(f"== {bench.__name__}", flush=True)
        bench.main(flag)
    print("== bench.report", flush=True)
    return report.main(flag)


if __name__ == "__main__":
    sys.exit(main())
