"""`softmoe bench`: benchmarks are discovered sub-commands (softmoe/cli/bench.py)."""
import softmoe.bench.layer as bench_layer


def test_softmoe_bench_discovers_layer():
    from softmoe.cli import build_parser
    from softmoe.cli.bench import benchmark_modules

    assert "layer" in benchmark_modules()
    args = build_parser().parse_args(["bench", "layer", "--quick", "--threads", "1", "--out", "x"])
    assert args.func is bench_layer.run and args.quick and args.threads == 1 and args.out == "x"
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert bench_layer.__doc__.splitlines()[0][:40] in " ".join(help_text.split())


def test_softmoe_bench_without_benchmark_prints_usage(capsys):
    from softmoe.cli import main

    assert main(["bench"]) == 2
    assert "BENCHMARK" in capsys.readouterr().out
