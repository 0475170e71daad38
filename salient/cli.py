"""The ``salient`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import importlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from salient import config as cfgmod
from salient import preflight, resources, stopping, storage, tables
from salient.errors import LINK_LOOP, ConfigError, InputError, UserError

# Local-run defaults (docs/design.md §4): no telemetry, Ray kept on loopback with auth off.
LOCAL_ENV_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

EXIT_BUG = 1  # an unexpected exception: a bug in Salient
EXIT_STORE = 4  # a store refused a read or a write (permissions, a full disk, ...)
EXIT_SIGTERM = stopping.EXIT_CODE
STOPPED = "salient: stopped (SIGTERM); finished work is kept, the next run resumes it"


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
    sections = preflight.present_sections(cfg)
    if not sections:
        raise ConfigError(["config: sets none of dataset, model, output; nothing to validate"])
    preflight.check(cfg, sections)
    print(f"config ok: checked {', '.join(sections)}")
    return 0


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While the block runs, SIGTERM stops it in order: an exception in the main thread unwinds
    it, then the command prints :data:`STOPPED` and exits with :data:`EXIT_SIGTERM`, whatever the
    exception became on the way out (Prefect's TerminationSignal, Ray's SystemExit)."""
    try:
        with stopping.noting_sigterm():
            yield
    except BaseException:
        if not stopping.received():
            raise
    if stopping.received():
        print(STOPPED, file=sys.stderr)
        raise SystemExit(EXIT_SIGTERM)


def _import_rebuild_flow() -> Callable[..., dict]:
    """The rebuild flow, imported without the native crash handler of the Ray driver in this
    process: that handler turns a SIGTERM into a stack dump, and into SIGABRT 3 s later while the
    run still cleans up. Ray reads the switch once, when imported; Ray's workers keep the handler."""
    key = "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"
    mine = key not in os.environ
    if mine:
        os.environ[key] = "1"
    try:
        from flows.rebuild import rebuild_flow
    finally:
        if mine:
            del os.environ[key]  # the Ray processes this one starts inherit its environment
    return rebuild_flow


def run_stages(cfg: cfgmod.Config, names: list[str] | None, wait_s: float = 0.0) -> dict:
    """The pre-flight of the stages ``names`` (None: every stage that applies), then the rebuild
    flow that runs them, once; a SIGTERM meanwhile ends the command with exit code 143."""
    from salient import stages as registry

    rebuild_flow = _import_rebuild_flow()
    with _sigterm_stops():
        checked = preflight.for_stages(cfg, registry.select(cfg, names))
        return rebuild_flow(cfg, names, wait_s, checked)


def _print_summaries(result: dict) -> None:
    from salient import stages as registry

    for name, summary in result["stages"].items():
        print(registry.BY_NAME[name].describe(summary))


def cmd_run(args: argparse.Namespace) -> int:
    names = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    return _run_and_print(_load(args), names, args.wait)


def _run_and_print(cfg: cfgmod.Config, names: list[str] | None, wait_s: float = 0.0) -> int:
    result = run_stages(cfg, names, wait_s)
    _print_summaries(result)
    state = "published as latest" if result["published"] else "not published (a subset of stages; `salient publish` publishes it)"
    print(f"build {result['build_id']}: {storage.normalize_uri(result['build'])} ({state})")
    return 0


def cmd_builds(args: argparse.Namespace) -> int:
    from salient import builds

    rows = builds.list_builds(args.root)
    if not rows:
        print(f"no builds under {args.root}")
        return 0
    for b in rows:
        marks = ",".join(m for m in ("latest", "current") if b[m])
        state = f"complete {b['completed']}" if b["complete"] else "unfinished"
        counts = " ".join(f"{k}={v}" for k, v in sorted(b["counts"].items()))
        print(f"{b['build_id']}  {state:<36} {marks:<15} {counts}".rstrip())
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from salient import builds

    s = builds.gc(args.root, args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {len(s['removed_builds'])} builds ({', '.join(s['removed_builds']) or 'none'}) and "
        f"{s['removed_cache_entries']} cache entries; kept {', '.join(s['kept_builds']) or 'none'}"
    )
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from salient import builds

    build_id = args.build or builds.read_pointer(args.root, "current")
    if build_id is None:
        raise InputError(f"{args.root!r} has no current build; give --build ID (see `salient builds {args.root}`)")
    if not builds.is_complete(args.root, build_id):
        raise InputError(
            f"build {build_id} has no manifest, so it may lack tables; finish it with `salient run CONFIG`, "
            "which publishes it"
        )
    builds.publish(args.root, build_id)
    print(f"latest -> {build_id}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from prefect.settings import get_current_settings

    from flows.rebuild import rebuild_from_file

    cfg = _load(args)
    preflight.check(cfg, ["output"])  # each run checks the rest
    if not get_current_settings().api.url:
        raise ConfigError([
            "schedules need a running Prefect server (the embedded one has no scheduler): start one with "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, then run this again"
        ])
    print(f"serving the rebuild of {args.config} on the schedule {args.cron!r} (Ctrl-C stops)")
    rebuild_from_file.serve(
        name=args.name, cron=args.cron,
        parameters={"config_uri": storage.normalize_uri(args.config), "overrides": args.overrides},
    )
    return 0


def _stage_command(name: str) -> Callable[[argparse.Namespace], int]:
    from salient import stages as registry

    def command(args: argparse.Namespace) -> int:
        cfg = registry.BY_NAME[name].with_arguments(_load(args), args)
        _print_summaries(run_stages(cfg, [name]))
        return 0

    return command


def cmd_annotate_serve(args: argparse.Namespace) -> int:
    from salient import app

    cfg = _load(args)
    preflight.check(cfg, ["output"])
    token = app.token_from_env(args.token)
    if not 0 < args.read_timeout < float("inf"):
        raise InputError(f"--read-timeout {args.read_timeout}: give a finite number of seconds above 0")
    app.serve(app.settings_from_config(cfg, args.build, token, args.read_timeout), args.host, args.port)
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    from salient import builds, metadata, study

    cfg = _load(args)
    preflight.check(cfg, ["dataset", "output"])
    meta = metadata.read_class_metadata(cfg.dataset.class_metadata) if cfg.dataset.class_metadata else None
    s = study.export_study(
        builds.open_current(cfg.output).build, cfg.dataset.root, cfg.preprocess.resize, cfg.preprocess.crop, cfg.discover.images_per_pair, meta, cfg.discover.base_url
    )
    print(f"study: {s['pairs']} pairs ({s['made']} made, {s['skipped']} skipped) -> {s['tasks']}")
    return 0


def cmd_study_ingest(args: argparse.Namespace) -> int:
    from salient import builds, ingest, study

    cfg = _load(args)
    preflight.check(cfg, ["output"])
    build = builds.open_current(cfg.output).build
    files = study.study_answer_files(cfg.output, args.answers)
    metadata_uri = cfg.dataset.class_metadata if cfg.dataset else None
    s = study.ingest_study(build, files, ingest.known_classes(build, metadata_uri), cfg.output)
    agreement = "n/a" if s["overall_agreement"] is None else f"{s['overall_agreement']:.1%}"
    print(f"study: {s['answers']} answers ({s['rejected']} rejected) for {s['pairs']} pairs; overall agreement {agreement}")
    return 0


def cmd_import_reference(args: argparse.Namespace) -> int:
    from salient.reference import import_reference

    cfg = _load(args)
    if cfg.dataset is None or cfg.output is None:
        raise InputError(f"{args.config}: `salient import reference` needs the dataset and output sections")
    s = import_reference(args.release, cfg, args.answers or cfg.annotations.answers)
    print(
        f"imported {s['masks']} masks of {s['images']} images ({s['core']} core, {s['spurious']} spurious pairs "
        f"from {s['answers']} answers) into {s['build']}, published as latest"
    )
    for reason, n in s["rejected_by_reason"].items():
        print(f"rejected {n}: {reason} (listed in {tables.IMPORT_REJECTED.path})")
    return 0


def cmd_export_reference(args: argparse.Namespace) -> int:
    from salient.dataset import build_of
    from salient.reference import LEFT_OUT, export_reference

    s = export_reference(build_of(args.root, args.build), args.dest)
    print(f"exported {s['masks']} masks of {s['classes']} classes to {s['dest']}")
    for reason, n in s["left_out_reasons"].items():
        print(f"left out {n} masks: image {reason} (listed in {LEFT_OUT})")
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
        stages=[_run_demo_rebuild],
    )
    return 0


def _run_demo_rebuild(config_path: str) -> int:
    return _run_and_print(cfgmod.load(config_path, []), None)


VALIDATE_HELP = "check a config before any compute"


def _validate_parser() -> argparse.ArgumentParser:
    """``salient validate`` alone: it needs no stage, so a config it refuses is answered before the
    stage registry (and with it torch and torchvision, seconds of start-up) is imported."""
    p = argparse.ArgumentParser(prog="salient validate", description=VALIDATE_HELP)
    _validate_args(p)
    return p


def _validate_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.set_defaults(func=cmd_validate, command="validate")


def _stage_parsers(sub: argparse._SubParsersAction, group: str | None) -> None:
    """A command per stage of the registry under ``group`` (None: top level)."""
    from salient import stages as registry

    for stage in registry.STAGES:
        if stage.group == group:
            p = sub.add_parser(stage.name, help=stage.help)
            _config_args(p)
            stage.add_arguments(p)
            p.set_defaults(func=_stage_command(stage.name), builds=True)


def build_parser() -> argparse.ArgumentParser:
    from salient import stages as registry

    parser = argparse.ArgumentParser(prog="salient", description="Discover spurious features of image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    _validate_args(sub.add_parser("validate", help=VALIDATE_HELP))

    _stage_parsers(sub, None)

    p = sub.add_parser("run", help="the whole rebuild as one Prefect flow (or --stages a,b)")
    _config_args(p)
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(registry.NAMES)} (runs them on the current build, without publishing)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for another rebuild of the same output to finish")
    p.set_defaults(func=cmd_run, builds=True)

    p = sub.add_parser("builds", help="list the builds under an output root")
    p.add_argument("root", metavar="OUT", help="output root (the config's `output`)")
    p.set_defaults(func=cmd_builds)

    p = sub.add_parser("gc", help="remove old builds and the cache entries only they use (answers are kept)")
    p.add_argument("root", metavar="OUT", help="output root (the config's `output`)")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="complete builds to keep (latest and current are always kept)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("publish", help="point `latest` at a complete build (default: the current one)")
    p.add_argument("root", metavar="OUT", help="output root (the config's `output`)")
    p.add_argument("--build", help="build id (default: the current build)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("serve", help="serve the rebuild flow on a cron schedule from this host")
    _config_args(p)
    p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 0" (Sundays 03:00)')
    p.add_argument("--name", default="salient-rebuild", help="deployment name")
    p.set_defaults(func=cmd_serve)

    annotate = sub.add_parser("annotate", help="annotation helpers").add_subparsers(dest="annotate_command", required=True)
    _stage_parsers(annotate, "annotate")
    p = annotate.add_parser("serve", help="a web page where people label the pairs of a build; answers go to OUT/annotations/incoming/")
    _config_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs a token)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--build", metavar="ID", default=None, help="the build whose pairs to label (default: the latest)")
    p.add_argument("--token", default=None, help="shared token every request must carry (default: $SALIENT_APP_TOKEN)")
    p.add_argument("--read-timeout", type=float, default=10.0, metavar="SECONDS", help="seconds a client may take to send a request's headers, and its body (default 10)")
    p.set_defaults(func=cmd_annotate_serve)

    study = sub.add_parser("study", help="the paper's generalisation study, for people").add_subparsers(dest="study_command", required=True)
    p = study.add_parser("export", help=f"per pair: top-5 images and heatmaps against the last 5 kept, and {tables.STUDY_TASKS.path}")
    _config_args(p)
    p.set_defaults(func=cmd_study_export)
    p = study.add_parser("ingest", help="agreement per pair from study answers (same | different | A_unclear | B_unclear)")
    _config_args(p)
    p.add_argument("--answers", action="append", default=[], metavar="URI", help="a study answer CSV (repeatable)")
    p.set_defaults(func=cmd_study_ingest)

    export = sub.add_parser("export", help="export a build for other tools").add_subparsers(dest="export_command", required=True)
    p = export.add_parser("reference", help="the original release's layout: wordnet_dict.py, <wnid>/image_names_map.csv, <wnid>/feature_<j>/<name>.JPEG")
    p.add_argument("root", metavar="OUT", help="output root (the config's `output`)")
    p.add_argument("dest", help="destination folder or URI")
    p.add_argument("--build", help="build id (default: the latest published build)")
    p.set_defaults(func=cmd_export_reference)

    imp = sub.add_parser("import", help="publish a build from another tool's output").add_subparsers(dest="import_command", required=True)
    p = imp.add_parser("reference", help="the original release's masks and MTurk answers, ready for `salient evaluate`")
    p.add_argument("release", metavar="RELEASE", help="the release folder: wordnet_dict.py and <wnid>/ folders")
    _config_args(p)
    p.add_argument("--answers", action="append", default=[], metavar="CSV", help="an answer CSV in the paper's schema (repeatable)")
    p.set_defaults(func=cmd_import_reference)

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


def describe_store_error(exc: OSError, building: bool) -> str:
    """One line for a store error: what failed, on what, and what to do (``building``: it stopped a
    build, which a new run resumes)."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "make the output writable (or point `output` somewhere writable)"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free space there (`salient gc OUT --keep N` removes old builds)"
    else:
        todo = "fix the store"
    where = "; ".join(getattr(exc, "__notes__", ()))
    again = "then run again: the build resumes where it stopped" if building else "then run again"
    return cfgmod.cut(str(exc)) + (f" ({cfgmod.cut(where)})" if where else "") + f"; {todo}, {again}"


class _NoExpectedTracebacks(logging.Filter):
    """Keeps Prefect's console lines about a failed run, without the traceback of a user's error or
    a store error: the command's last line says what failed and what to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (UserError, OSError)):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_expected_tracebacks() -> None:
    importlib.import_module("prefect.main")  # sets up Prefect's logging handlers
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_NoExpectedTracebacks())


def report_bug(exc: BaseException) -> str:
    """Write ``exc``'s traceback to a new file; returns its path."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    fd, path = tempfile.mkstemp(prefix=f"salient-bug-{stamp}-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write(storage.redact(f"salient {' '.join(sys.argv[1:])}\n\n"))
        fh.write(storage.redact("".join(traceback.format_exception(exc))))
    return path


def apply_env_defaults() -> None:
    """Give this process the local-run defaults and the worker environment where it has no value of
    its own: what `salient` gives itself, before torch is imported."""
    for key, value in LOCAL_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    resources.apply_worker_env()


def main(argv: Sequence[str] | None = None) -> int:
    apply_env_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["validate"]:
        args = _validate_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    building = getattr(args, "builds", False)
    try:
        if building:
            _quiet_expected_tracebacks()
        return func(args)
    except UserError as exc:
        for line in exc.lines:
            print(f"salient: {exc.label}: {storage.redact(line)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a path the user named: no store failed
            print(f"salient: error: {cfgmod.show(exc.filename or str(exc))}: {LINK_LOOP}", file=sys.stderr)
            return InputError.exit_code
        print(f"salient: error: {describe_store_error(exc, building)}", file=sys.stderr)
        return EXIT_STORE
    except KeyboardInterrupt:
        print("salient: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- anything else is a bug, reported as one
        first = cfgmod.cut((str(exc).strip().splitlines() or [""])[0])
        print(
            f"salient: internal error, a bug in Salient (not in your config or data): {type(exc).__name__}: {first}; "
            f"the traceback is in {report_bug(exc)}; please report it with that file",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
