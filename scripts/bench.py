"""Benchmark suites (see jaxkv/bench): python scripts/bench.py --suite cpu --out DIR."""

import sys

from jaxkv.bench import main

if __name__ == "__main__":
    sys.exit(main())
