"""The ``salient`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from salient import config as cfgmod

# Local-run defaults (design.md §4): no telemetry, Ray kept on loopback with auth off.
LOCAL_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

EXIT_CONFIG = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="config YAML (path or fsspec URI)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def _load(args: argparse.Namespace) -> cfgmod.Config:
    return cfgmod.load(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    sections = cfgmod.present_sections(cfg)
    if not sections:
        raise cfgmod.ConfigError(["config: sets none of dataset, model, output; nothing to validate"])
    cfgmod.check(cfg, sections)
    print(f"config ok: checked {', '.join(sections)}")
    return 0


def run_activations(cfg: cfgmod.Config) -> dict:
    """Check the config, run the activation flow, print its summary."""
    cfgmod.check(cfg, ["dataset", "model", "output"], need_discovery=True)
    from flows.activations import activations_flow

    summary = activations_flow(cfg)
    print(
        f"activations: {summary['images']} of {summary['planned']} images in {summary['shards']} shards "
        f"-> {cfg.output}/activations ({summary['failed']} failed)"
    )
    for uri in summary["failure_lists"]:
        print(f"  failures listed in {uri}")
    return summary


def cmd_activations(args: argparse.Namespace) -> int:
    run_activations(_load(args))
    return 0


def run_aggregate(cfg: cfgmod.Config) -> dict:
    """Check the config, run the aggregation flow, print its summary."""
    cfgmod.check(cfg, ["model", "output"], need_discovery=True)
    from flows.aggregate import aggregate_flow

    summary = aggregate_flow(cfg)
    print(
        f"aggregate: {summary['pairs']} pairs over {summary['classes']} classes from {summary['images']} images "
        f"(grouping: {summary['grouping']}, {summary['classes_without_images']} classes without images) -> {cfg.output}"
    )
    return summary


def cmd_aggregate(args: argparse.Namespace) -> int:
    run_aggregate(_load(args))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from salient import world

    summary = world.synthesize(
        args.out, classes=args.classes, per_class=args.per_class, size=args.size, rho=args.rho, seed=args.seed
    )
    counts = ", ".join(f"{split}: {n}" for split, n in summary["images"].items())
    print(f"world written to {args.out} ({counts})")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from salient import train

    result = train.train_demo(args.data, args.out, rho_free=args.rho_free, epochs=args.epochs, seed=args.seed)
    print(
        f"trained {'debiased' if args.rho_free else 'biased'} demo model in {result['seconds']:.1f}s "
        f"(train accuracy {result['train_accuracy']:.3f}) -> {args.out}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from salient import demo

    demo.run(
        args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed,
        stages=[lambda path: run_activations(cfgmod.load(path)), lambda path: run_aggregate(cfgmod.load(path))],
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salient", description="Discover spurious features of image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config before any compute")
    _config_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("activations", help="compute penultimate activations of every image (Ray + Prefect)")
    _config_args(p)
    p.set_defaults(func=cmd_activations)

    p = sub.add_parser("aggregate", help="feature importance, (class, feature) pairs and top images per neuron")
    _config_args(p)
    p.set_defaults(func=cmd_aggregate)

    p = sub.add_parser("synth", help="write the demo world: an ImageFolder dataset with ground-truth masks")
    p.add_argument("--out", required=True, help="output directory (or fsspec URI)")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=100, help="train images per class")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--rho", type=float, default=0.9, help="probability of a class's cue in train")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train-demo", help="train the small demo classifier on a synthetic world")
    p.add_argument("--data", required=True, help="world directory written by `salient synth`")
    p.add_argument("--out", required=True, help="checkpoint to write (robustness format)")
    p.add_argument("--rho-free", action="store_true", help="train the debiased twin on cue-decorrelated data")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_demo)

    p = sub.add_parser("demo", help="run the pipeline on the embedded demo world")
    p.add_argument("--out", default="demo-out", help="demo output directory")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except cfgmod.ConfigError as exc:
        for line in exc.lines:
            print(f"salient: config error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"salient: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        print("salient: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
