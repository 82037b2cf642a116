"""`make bench` / `make bench-quick`: every benchmark in turn (each prints its ratios and writes JSON)."""

from __future__ import annotations

import argparse
import sys

from bench import discover, export_speed, fragility, generate, keep, masked_forward, step_cost


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny models only (minutes)")
    quick = ap.parse_args(argv).quick
    flag = ["--quick"] if quick else []
    for bench in (step_cost, masked_forward, export_speed, generate, keep, fragility, discover):
        print(f"== {bench.__name__}", flush=True)
        bench.main(flag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
