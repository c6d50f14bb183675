"""`softmoe bench <name> [...]`: the benchmarks of package `softmoe.bench`.

Sub-commands are discovered: every module of `softmoe.bench` that defines
`add_arguments(parser)` and `run(args) -> int` becomes `softmoe bench <module name>`, with the
first line of its docstring as help. Adding a benchmark never edits this file."""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil


def benchmark_modules() -> dict:
    """{name: module} for every runnable module of `softmoe.bench`, sorted by name."""
    import softmoe.bench as package

    found = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if callable(getattr(module, "add_arguments", None)) and callable(getattr(module, "run", None)):
            found[info.name] = module
    return found


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark (layer, ...) and write its table",
                                   description="Benchmarks; each writes a Markdown and a CSV table.")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, module in benchmark_modules().items():
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.run, prechecks=[_check_out_and_threads])
    parser.set_defaults(func=lambda args: _usage(parser))


def _check_out_and_threads(args) -> None:
    """Before a benchmark runs: its --out folder can be written (it computes for minutes and
    must not fail only when it writes its tables), and --threads fits the machine (torch
    aborts creating 100000 threads)."""
    if getattr(args, "out", None) is not None:
        from softmoe._io import check_output_dir

        check_output_dir(args.out, "--out")
    threads = getattr(args, "threads", None)
    if threads is not None and threads > 4 * (os.cpu_count() or 1):  # more only slows down
        raise ValueError(f"--threads must be <= 4x this machine's {os.cpu_count()} CPUs, got {threads}")


def _usage(parser) -> int:
    parser.print_help()
    return 2

