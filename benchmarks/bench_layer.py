"""Soft MoE layer benchmark: `python benchmarks/bench_layer.py [--quick] [--threads N] [--out DIR]`.

A thin entry point; the benchmark is `softmoe.bench.layer` (also `softmoe bench layer`)."""
import sys

from softmoe.bench.layer import main

if __name__ == "__main__":
    sys.exit(main())
