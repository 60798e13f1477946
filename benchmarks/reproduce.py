#!/usr/bin/env python
"""Reproduce the DC-DiT paper's claims at CPU scale, v2: the entry point of the ``reproduction`` package.

    python benchmarks/reproduce.py --out runs/repro2 --seeds 0          # one seed (~2 h on 2 quiet cores)
    python benchmarks/reproduce.py --out /tmp/repro --smoke             # tiny everything (the test)
    python benchmarks/reproduce.py --help                               # stages, options

The stages, settings, scoring and report live in ``benchmarks/reproduction/``.
"""
import sys

from reproduction import MODELS, SHAPES_VARIANTS, main, scaffold_share  # noqa: F401  (what tests/test_reproduce.py reads)

if __name__ == "__main__":
    sys.exit(main())
