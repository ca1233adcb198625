"""``recsys-embed``: the command line. The CLI talks to people; the library only logs.

Commands: run, backtest, ingest, init, generate, bench, recommend, similar, serve, ui. What a person reads by
default fits on one screen: the results each command prints (stdout), warnings and errors (stderr), and progress
bars on a terminal. ``-v`` adds the library's INFO lines, ``-vv`` everything down to DEBUG (implicit's per-iteration
loss, Prefect's per-task lines); ``-q`` leaves the results and warnings only. Both work before or after the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys_embed.errors import RecsysEmbedError

DEFAULT_CONFIG = "configs/retail.yaml"
DESCRIPTION = """\
Train recommender embeddings (popularity, EASE, ALS, BPR, two-tower) on an interaction log, choose the best
on a validation window, and ship top-k and similar-item tables, tracked in MLflow and run as a Prefect flow.

quick start:
  recsys-embed run                          the main job: the shipped retail log (configs/retail.yaml)
  recsys-embed init LOG_PATH                sniff your own log and write configs/<name>.yaml, then
  recsys-embed run --config configs/<name>.yaml
  recsys-embed recommend --user 12347       top-k for one user from the latest run
  recsys-embed ui                           browse the runs in the MLflow UI
"""
EPILOG = "-q/-v and --mlflow-config go before or after the command. `recsys-embed COMMAND --help` for its options."
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("recsys-embed")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed; pip install -e .)"


def _setup_logging(args: argparse.Namespace) -> None:
    """What reaches the terminal: warnings and errors (default and ``-q``), INFO with ``-v``, DEBUG with ``-vv``.

    Loggers stay at INFO (DEBUG with ``-vv``) so Prefect's API handler still records a flow run's INFO lines for
    its UI and the bars' automatic rule (``progress.enabled``) holds; the terminal handler (``progress.LogHandler``,
    which prints through a live bar's console) applies the threshold. ``-q`` also turns bars off.
    """
    verbosity = -1 if args.quiet else int(args.verbose or 0)
    level = logging.WARNING if verbosity < 0 else (logging.DEBUG if verbosity >= 2 else logging.INFO)
    shown = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    from recsys_embed import progress

    # progress bars: never under --quiet; otherwise on an interactive terminal only
    progress.set_enabled(False if verbosity < 0 else None)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, progress.LogHandler)]:  # main() called again (tests)
        root.removeHandler(old)
    handler = progress.LogHandler(shown)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_QuietLibraries(verbosity))
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn goes through the handler too: above a live bar, not into it
    # Prefect's loggers at INFO (WARNING under -q): its API handler keeps each flow run's lines for the Prefect UI;
    # the terminal shows them with -v (per-task lines with -vv, _QuietLibraries).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging.getLevelName(max(level, logging.INFO)))
    # The ephemeral server's telemetry heartbeat can only fail offline, and it races the server's own
    # SQLite writes ("database is locked" tracebacks): keep it off unless the user turned it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server's 20 s start budget is not enough on a busy 2-core machine (measured: a timeout while
    # other jobs ran); waiting longer costs nothing when it starts fast.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # MLflow configures its own handler when imported, at MLFLOW_LOGGING_LEVEL (default INFO: "Creating initial
    # MLflow database tables..."); its upload/download bars follow our rule for bars.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not progress.enabled():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if verbosity < 0:
        # what a user can act on stays (our DataWarning, config errors); library chatter about its own internals
        # (deprecations, "consider increasing num_workers", ...) does not
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", module=r"(pytorch_lightning|lightning_fabric|torch|mlflow|prefect)\b")


_NOISY = ("alembic", "mlflow", "urllib3", "distributed", "httpx", "pytorch_lightning", "lightning_fabric")
# INFO lines per task or per iteration: on the terminal only with -vv (Prefect's API still gets the task lines)
_PER_STEP = ("prefect.task_runs", "implicit")


class _QuietLibraries(logging.Filter):
    """Drop the INFO chatter of noisy libraries (GPU/TPU availability, tips) whatever level they set themselves,
    and per-task / per-iteration lines (``_PER_STEP``) below ``-vv``."""

    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.name.startswith(_NOISY):
            return False
        return self.verbosity >= 2 or not record.name.startswith(_PER_STEP)


def _config_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_CONFIG, what: str = "") -> None:
    p.add_argument("--config", default=default, metavar="YAML",
                   help=f"pipeline YAML{what} (default: {default or 'none'})")  # fmt: skip
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set ingest.source.path=logs/*.csv (repeatable)",
    )


def _check_config_first(args: argparse.Namespace) -> None:
    """Validate the pipeline config and mlflow.yml before Prefect is imported or started: a mistake costs a
    second and one line, not a server start and a traceback."""
    from recsys_embed.config import load_config, load_mlflow_settings

    load_config(args.config, args.overrides)
    load_mlflow_settings(args.mlflow_config)


def cmd_run(args: argparse.Namespace) -> int:
    _check_config_first(args)
    from flows.api import check_server

    check_server()  # a configured Prefect server that does not answer: say so now, not after a long timeout
    from flows.embedding_pipeline import embedding_pipeline
    from recsys_embed.evaluation.metrics import metrics_table
    from recsys_embed.tracking.reporting import format_metrics
    from recsys_embed.tracking.tracker import redact_uri
    from recsys_embed.types import RowReport

    manifest: Mapping[str, Any] = embedding_pipeline(
        config_path=args.config, overrides=args.overrides, mlflow_config=args.mlflow_config, force=args.force
    )
    if manifest.get("nothing_new"):
        reason = manifest["nothing_new"]
        print(f"\n{reason[:1].upper()}{reason[1:]}: nothing trained, exported or registered (--force re-runs anyway).")
        if manifest.get("latest"):
            print(f"Latest manifest: {manifest['latest']['run_dir']}/summary.json")
        return 0
    report = RowReport.from_dict(manifest["accounting"])
    ks = sorted({int(k.rsplit("_", 1)[1]) for m in manifest["metrics"].values() for k in m if "_at_" in k})
    print(f"\nRow accounting ({manifest['config']}):")
    print(report.format(manifest.get("split")))
    split = manifest["split"]
    print(f"\nSplit: {split.get('rule', split.get('method'))}")
    print("\nValidation metrics (what selection reads; warm users):")
    print(format_metrics(metrics_table(manifest["val_metrics"]), ks))
    print(f"\nTest metrics (reported once, never used to choose; {manifest['test_cold_users'] or 0:,} cold test "
          "users reported apart):")  # fmt: skip
    print(format_metrics(metrics_table(manifest["metrics"]), ks))
    tuning = manifest.get("tuning")
    if tuning and tuning.get("models"):
        from recsys_embed.models.tuning import format_table

        how = f"search took {tuning['seconds']:.0f} s" + (", reused from the cache" if tuning.get("cached") else "")
        print(f"\nTuning on the validation window ({how}): {manifest['primary_metric']}, defaults vs tuned")
        print(format_table(tuning, manifest["primary_metric"]))
    print(f"\nBest model: {manifest['best_model']} ({(manifest.get('selection') or {}).get('reason')})")
    print("\nShipped tables (refit on every kept event):" if any(
        (e.get("trained_on") or {}).get("fit") == "all kept events" for e in manifest["exports"].values()
    ) else "\nShipped tables (evaluation fits):")  # fmt: skip
    for m, e in manifest["exports"].items():
        print(f"  {m:<12} top-k   {e['topk']}  ({e['topk_rows']:,} rows, {e.get('topk_users', 0):,} users, "
              f"{e.get('fallback_users', 0):,} from the popularity fallback)")  # fmt: skip
        if e.get("similar_items"):
            print(f"  {'':<12} similar {e['similar_items']}")
    cur = manifest.get("current")
    if cur:
        print(f"  champion tables: {cur['current']} -> {cur['model']}"
              f"{' v' + str(cur['version']) if cur.get('version') else ''} ({cur['champion_file']})")  # fmt: skip
    reg = manifest.get("registry")
    if reg:
        print(f"\nRegistry: {reg['name']} v{reg['version']} -> {reg['alias']} ({reg['metric']} {reg['reason']})")
    if manifest.get("database"):
        db = manifest["database"]
        print(f"Database: {redact_uri(db['uri'])} tables {db['tables']}")
    t = manifest.get("timing") or {}
    if t:
        print(f"Time: evaluation {t.get('evaluation_s', 0):.0f} s, refit + export {t.get('refit_export_s', 0):.0f} s")
    print(f"\nManifest: {manifest['run_dir']}/summary.json")
    print(
        f"MLflow run: {manifest['mlflow']['run_id']} ({redact_uri(manifest['mlflow']['tracking_uri'])}); "
        "`recsys-embed ui` to inspect"
    )
    return 0


def _date(text: str) -> Any:
    from datetime import datetime

    try:  # a date without a zone is read in ingest.assume_timezone, as the log's times are
        return datetime.fromisoformat(text)
    except ValueError:
        msg = f"{text!r} is not an ISO date or time, e.g. 2011-10-01 or 2011-10-01T12:00"
        raise argparse.ArgumentTypeError(msg) from None


def cmd_backtest(args: argparse.Namespace) -> int:
    _check_config_first(args)  # like run: a bad --set costs a second and one line, not a server start
    from flows.api import check_server

    check_server()
    from flows.backtest import backtest_flow

    out: dict[str, Any] = backtest_flow(
        config_path=args.config,
        overrides=args.overrides,
        mlflow_config=args.mlflow_config,
        holdout_days=args.holdout_days,
        cutoff=args.cutoff,
        per_model=args.per_model,
    )
    print()
    print(out["markdown"])
    print(f"Pipeline run (before the cutoff): {out['pipeline']['run_dir']}")
    print(f"Results: {out['paths']['json']}, {out['paths']['markdown']}")
    print(f"MLflow run: {out['mlflow_run_id']}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from recsys_embed.config import load_config
    from recsys_embed.data.ingest import load_events
    from recsys_embed.data.interactions import build_interactions

    cfg = load_config(args.config, args.overrides)
    ev = load_events(cfg.ingest)
    inter = build_interactions(ev.events, cfg.ingest, ev.report)
    ev.report.details.update(
        users=inter.shape[0], items=inter.shape[1], nnz=int(inter.matrix.nnz), density=inter.density
    )
    ev.report.check()
    print(f"Ingest report for {cfg.ingest.source.path} ({len(ev.files)} file(s)):")
    print(ev.report.format())
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import shlex

    from recsys_embed.data.sniff import (
        check_name,
        default_name,
        describe,
        propose,
        read_sample,
        refuse_overwrite,
        render_yaml,
        write_config,
    )

    name = check_name(args.name or default_name(args.log_path))
    target = Path(args.config_dir) / f"{name}.yaml"
    refuse_overwrite(target, args.force)
    hints = {"user": args.user, "item": args.item, "timestamp": args.timestamp, "event_type": args.event_type}
    proposal = propose(read_sample(args.log_path, args.format), name, hints)
    argv = ["recsys-embed", "init", args.log_path]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in (("name", args.name), *hints.items()) if v]
    write_config(render_yaml(proposal, shlex.join(argv)), target, args.force)
    print(describe(proposal))
    print(f"\nWrote {target}. Read the comments (CHECK marks guesses), then run:")
    print(f"  recsys-embed run --config {shlex.quote(str(target))}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from recsys_embed.data.generate import PRESETS, generate

    spec = PRESETS[args.preset]
    changes = {
        k: v
        for k, v in (("n_events", args.events), ("n_users", args.users), ("n_items", args.items), ("seed", args.seed))
        if v is not None
    }
    spec = replace(spec, **changes)
    summary = generate(spec, Path(args.out))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from recsys_embed.bench.run import main as bench_main
    from recsys_embed.bench.run import scaling_main

    suites = [s for s in args.suites if s not in ("scaling", "generalization")]
    rc = 0
    if "scaling" in args.suites:  # its own table and JSON: stages x sizes, not candidate against baseline
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        rc = scaling_main(sizes, str(Path(args.json).with_name("scaling.json")) if args.json else None)
    if "generalization" in args.suites:  # init + run on logs of several shapes, scored on held-out parts
        from recsys_embed.bench.generalization import main as generalization_main

        logs = [s.strip() for s in args.logs.split(",") if s.strip()]
        rc = generalization_main(logs, "bench_results/generalization",
                                 str(Path(args.json).with_name("generalization.json")) if args.json else None)
    return bench_main(suites, args.size, args.repeats, args.json) if suites else rc


def _latest(args: argparse.Namespace) -> dict[str, Any]:
    from recsys_embed.config import load_config

    cfg = load_config(args.config, args.overrides)
    latest = Path(cfg.output_root) / cfg.name / "latest.json"
    if not latest.exists():
        raise RecsysEmbedError(f"no finished run under '{latest.parent}'; run `recsys-embed run` first")
    run_dir = Path(json.loads(latest.read_text())["run_dir"])
    manifest: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    return manifest


FALLBACK_NOTE = "  (popularity fallback: the model has no history of this user)"


def unknown_user(user: str) -> RecsysEmbedError:
    """The one answer for a user the model does not know, locally and from the registry (exit 2).

    Not the popularity fallback the served model returns to a program: a person asking about one ID has far more
    often mistyped it (or its type) than met a new user, and a plausible list would hide that."""
    return RecsysEmbedError(
        f"user {user!r} is unknown to the model: it has no kept event in the data the model was trained on (check "
        "the ID); a program calling the served model gets the popularity top-k for such a user"
    )


def _local_source(manifest: Mapping[str, Any], model: str | None, user: str) -> str | None:
    """Where ``user``'s rows in the latest run's top-k table come from ("model" / "fallback"), None when the table
    has no rows for that ID; "model" when the manifest names no such table (``recommend_for_user`` says why)."""
    import polars as pl

    from recsys_embed.io import read_table

    export = (manifest.get("exports") or {}).get(model or manifest.get("best_model"))
    if not export or not export.get("topk"):
        return "model"
    table = read_table(export["topk"])
    key: Any = user
    if table["user_id"].dtype.is_integer():
        try:
            key = int(user.strip())
        except ValueError:
            return None  # not an ID of this run's integer type: unknown, as the served model reads it
    rows = table.filter(pl.col("user_id") == key).head(1)
    if rows.height == 0:
        return None
    return str(rows["source"][0]) if "source" in rows.columns else "model"


def cmd_recommend(args: argparse.Namespace) -> int:
    from recsys_embed.serving.answer import recommend_for_user

    if args.from_registry:
        import pandas as pd

        from recsys_embed.config import load_config, load_mlflow_settings, registered_name
        from recsys_embed.serving.registry import load_recommender

        settings = load_mlflow_settings(args.mlflow_config)
        name = registered_name(load_config(args.config, args.overrides), settings)  # this pipeline's model
        model = load_recommender(settings, args.alias, name)
        if model.unwrap_python_model().user_indices([args.user])[0] < 0:
            raise unknown_user(args.user)
        out = pd.DataFrame(model.predict(pd.DataFrame({"user_id": [args.user]}), params={"k": args.k})).iloc[0]
        print(f"Top {len(out['item_ids'])} for user {args.user} ({name}@{args.alias}):")
        if out.get("source") == "fallback":
            print(FALLBACK_NOTE)
        texts = out["item_texts"] if "item_texts" in out.index else [None] * len(out["item_ids"])  # the log's text
        for rank, (item, score, text) in enumerate(zip(out["item_ids"], out["scores"], texts, strict=True), 1):
            print(f"  {rank:>2}. {item!s:<12} {score:8.4f}  {text or ''}".rstrip())
        return 0
    manifest = _latest(args)
    source = _local_source(manifest, args.model, args.user)
    if source is None:
        raise unknown_user(args.user)
    head, _, rest = recommend_for_user(manifest, args.user, args.k, args.model, args.explain).partition("\n")
    print("\n".join([head, *([FALLBACK_NOTE] if source == "fallback" else []), *([rest] if rest else [])]))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from recsys_embed.serving.answer import similar_to_item

    manifest = _latest(args)
    print(similar_to_item(manifest, args.item, args.k, args.model))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.cron:
        args.overrides = [*args.overrides, f"schedule.cron={args.cron}"]
    if args.name:
        args.overrides = [*args.overrides, f"schedule.deployment_name={args.name}"]
    _check_config_first(args)
    from flows.api import require_server

    api = require_server("recsys-embed serve")  # refuses within seconds when there is no server to serve against
    from flows.deploy import build_deployment, serve_deployment, trial_name, trial_overrides
    from recsys_embed.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.trial:  # its own outputs, registry and no database: production is never touched
        args.overrides = [*args.overrides, *trial_overrides(cfg)]
        cfg = load_config(args.config, args.overrides)
    if args.cron and not cfg.schedule.deployment_name:  # a cron to try gets its own deployment, never the nightly
        args.overrides = [*args.overrides, f"schedule.deployment_name={trial_name(cfg)}"]
    dep = build_deployment(args.config, args.overrides, args.mlflow_config)
    crons = [str(getattr(s.schedule, "cron", s.schedule)) for s in dep.schedules or []]
    until = "runs due now, then exit" if args.run_once else "Ctrl-C stops"
    print(f"Serving deployment 'embedding-pipeline/{dep.name}' (cron {', '.join(crons)} {cfg.schedule.timezone}) "
          f"against {api}; {until}", flush=True)  # fmt: skip
    if not serve_deployment(dep, run_once=args.run_once):
        print(f"Stopped (Ctrl-C). The deployment stays registered; its scheduled runs wait for the next `serve`, or "
              f"remove it with `prefect deployment delete 'embedding-pipeline/{dep.name}'`.")  # fmt: skip
        return 130
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from recsys_embed.config import load_config, load_mlflow_settings, registered_name
    from recsys_embed.tracking.tracker import redact_uri, resolve_settings

    settings = resolve_settings(load_mlflow_settings(args.mlflow_config))
    cfg = load_config(args.config, args.overrides) if args.config else None  # validated before the server starts
    base = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {redact_uri(settings.tracking_uri)} at {base}")
    if cfg is not None:
        print(f"  {cfg.name}'s registered model: {base}/#/models/{registered_name(cfg, settings)}")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.tracking_uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:  # the server got the Ctrl-C too and stops; no traceback
        return 130


def cmd_gc(args: argparse.Namespace) -> int:
    from recsys_embed.config import RetentionConfig, load_config, load_mlflow_settings
    from recsys_embed.pipeline.lock import run_lock
    from recsys_embed.pipeline.retention import collect

    cfg = load_config(args.config, args.overrides)
    settings = load_mlflow_settings(args.mlflow_config)
    given = {k: v for k, v in (("keep_runs", args.keep_runs), ("keep_versions", args.keep_versions)) if v is not None}
    if given.get("keep_runs", 1) < 1 or given.get("keep_versions", 0) < 0:
        raise RecsysEmbedError("gc: --keep-runs must be >= 1 (the latest run always stays) and --keep-versions >= 0")
    keep = RetentionConfig.model_validate({**cfg.retention.model_dump(), **given})
    with run_lock(Path(cfg.output_root) / cfg.name):  # no run writes while it prunes
        report = collect(cfg, settings, keep, dry_run=args.dry_run)
    print(f"gc {cfg.name} (keep {keep.keep_runs} runs, {keep.keep_versions} versions besides aliased ones"
          f"{'; dry run, nothing deleted' if args.dry_run else ''}):")  # fmt: skip
    print(report.format())
    return 0


def _common() -> argparse.ArgumentParser:
    """The options every command takes after its name too (``recsys-embed run -q``); SUPPRESS defaults, so an
    option given before the command is not reset by the command's parser."""
    c = argparse.ArgumentParser(add_help=False)
    _verbosity(c, argparse.SUPPRESS)
    return c


def _verbosity(p: argparse.ArgumentParser, default: Any = None) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", default=False if default is None else default,
                   help="results and warnings only, no progress bars")  # fmt: skip
    g.add_argument("-v", "--verbose", action="count", default=0 if default is None else default,
                   help="-v: the library's INFO lines too; -vv: DEBUG as well (per-iteration and per-task lines)")
    p.add_argument("--mlflow-config", default="mlflow.yml" if default is None else default, metavar="YAML",
                   help="MLflow tracking settings (default: mlflow.yml)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-embed", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit")
    _verbosity(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common()

    def command(name: str, summary: str, fn: Any) -> argparse.ArgumentParser:
        """A command: ``summary`` is its line in ``recsys-embed --help`` and its ``--help`` description."""
        c = sub.add_parser(name, help=summary, description=summary[:1].upper() + summary[1:] + ".", parents=[common])
        c.set_defaults(fn=fn)
        return c

    r = command("run", "run the whole pipeline (a Prefect flow) and print its summary", cmd_run)
    _config_arg(r)
    r.add_argument("--force", action="store_true", help="incremental runs: run even when no log file is new")

    bt = command("backtest", "run the pipeline on the log before a cutoff and score its tables on what happened "
                 "after, beside popularity and plain implicit ALS", cmd_backtest)  # fmt: skip
    _config_arg(bt)
    when = bt.add_mutually_exclusive_group(required=True)
    when.add_argument("--holdout-days", type=int, metavar="N", help="cutoff = the last kept event - N days")
    when.add_argument("--cutoff", type=_date, metavar="DATE", help="cutoff date or time (ISO, e.g. 2011-10-01)")
    bt.add_argument("--per-model", action="store_true", help="score every model refitted with its configured and "
                    "with its tuned parameters (a second pipeline run, with the search off)")  # fmt: skip

    i = command("ingest", "read and validate the log only, and print the row accounting", cmd_ingest)
    _config_arg(i)

    ini = command("init", "sniff your own log and write configs/<name>.yaml for it (then: run --config)", cmd_init)
    ini.add_argument("log_path", metavar="LOG_PATH", help="a file, a glob ('logs/*.csv.gz') or a partitioned folder")
    ini.add_argument("--name", help="pipeline name: configs/<name>.yaml, outputs/<name>/ (default: from LOG_PATH)")
    ini.add_argument("--force", action="store_true", help="overwrite an existing configs/<name>.yaml")
    ini.add_argument("--format", default="auto", choices=["auto", "csv", "parquet", "ndjson"],
                     help="the log's format (default: auto, from the file names and content)")  # fmt: skip
    for role in ("user", "item", "timestamp", "event-type"):
        ini.add_argument(f"--{role}", metavar="COLUMN", help=f"the {role} column, when the guess is wrong")
    ini.add_argument("--config-dir", default="configs", help="where the config goes (default: configs)")

    gen = command("generate", "write a seeded synthetic log with planted structure (hive-partitioned Parquet)",
                  cmd_generate)  # fmt: skip
    gen.add_argument("--preset", default="1m", choices=["tiny", "1m", "20m", "100m"],
                     help="size preset: events, users and items (default: 1m, MovieLens-1M-like)")  # fmt: skip
    gen.add_argument("--out", required=True, metavar="DIR", help="output folder (created; Parquet partitions)")
    gen.add_argument("--events", type=int, metavar="N", help="number of events (default: the preset's)")
    gen.add_argument("--users", type=int, metavar="N", help="number of distinct users (default: the preset's)")
    gen.add_argument("--items", type=int, metavar="N", help="number of distinct items (default: the preset's)")
    gen.add_argument("--seed", type=int, metavar="N", help="random seed; the same seed writes the same files "
                     "(default: the preset's, 0)")  # fmt: skip

    b = command("bench", "run benchmark suites and print measured ratios side by side", cmd_bench)
    b.add_argument("suites", nargs="*", default=["ingest", "als", "topk"],
                   help="ingest | als | topk | lightning | e2e | ann | scaling (scaling uses --sizes)")  # fmt: skip
    b.add_argument("--size", default="1m", help="tiny | 1m | 20m | 100m")
    b.add_argument("--sizes", default="tiny,1m", help="scaling: comma-separated sizes, e.g. 1m,20m,100m (100m is "
                   "skipped with a message when memory would not allow it)")  # fmt: skip
    b.add_argument("--logs", default="ratings,pairs,counts,retail",
                   help="generalization: comma-separated logs (ratings, pairs, counts, retail)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", default="bench_results/results.json")

    rec = command("recommend", "top-k for one user, from the latest run or from the registered model", cmd_recommend)
    _config_arg(rec)
    rec.add_argument("--user", required=True, metavar="ID", help="the user's ID, as in the log")
    rec.add_argument("-k", type=int, default=10, metavar="K", help="how many items (default: 10)")
    rec.add_argument("--model", default=None, help="the run's model to ask (default: the run's best model)")
    rec.add_argument("--explain", action="store_true", help="show the history items behind each recommendation")
    rec.add_argument("--from-registry", action="store_true", help="answer from the registered model (MLflow)")
    rec.add_argument("--alias", default="champion", help="registry alias with --from-registry (default: champion)")

    sim = command("similar", "items similar to one item, from the latest run", cmd_similar)
    _config_arg(sim)
    sim.add_argument("--item", required=True, metavar="ID", help="the item's ID, as in the log")
    sim.add_argument("-k", type=int, default=10, metavar="K", help="how many items (default: 10)")
    sim.add_argument("--model", default=None, help="the run's model to ask (default: the run's best model)")

    srv = command("serve", "serve the pipeline as a Prefect deployment on its cron schedule (needs a Prefect "
                  "server)", cmd_serve)  # fmt: skip
    _config_arg(srv)
    srv.add_argument("--cron", metavar="CRON", help="try another schedule, e.g. --cron '* * * * *' (every minute); "
                     "without --name it is its own deployment, <name>-cron-<schedule>, so the nightly one is left "
                     "as it is (default: schedule.cron, '0 3 * * *')")  # fmt: skip
    srv.add_argument("--name", metavar="NAME", help="the deployment's name (default: schedule.deployment_name, else "
                     "<name>-nightly)")  # fmt: skip
    srv.add_argument("--trial", action="store_true", help="a trial deployment: its runs write to outputs/<name>-trial/ "
                     "and register as <model>-trial, with no database export, so production is never touched")
    srv.add_argument("--run-once", action="store_true", help="execute the runs due now, then exit (for tests/cron)")

    ui = command("ui", "start the MLflow UI on the configured tracking store", cmd_ui)
    _config_arg(ui, None, ": also print the link to its registered model")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")

    gc = command("gc", "prune old runs' MLflow artifacts and run folders and old registered versions (never the "
                 "champion or what current/ serves)", cmd_gc)  # fmt: skip
    _config_arg(gc)
    gc.add_argument("--keep-runs", type=int, metavar="N", help="pipeline runs that keep their files, newest first "
                    "(default: retention.keep_runs, 10)")  # fmt: skip
    gc.add_argument("--keep-versions", type=int, metavar="N", help="registered versions kept besides aliased ones "
                    "(default: retention.keep_versions, 5)")  # fmt: skip
    gc.add_argument("--dry-run", action="store_true", help="say what would be pruned and its size; delete nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:  # one before the command, the other after it
        parser.error("-q/--quiet and -v/--verbose exclude each other")
    _setup_logging(args)
    try:
        return int(args.fn(args))
    except RecsysEmbedError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # one line, no traceback
        print(f"error: {' '.join([*lines[:1], '; '.join(lines[1:])]).strip()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was committed stays, a half-written table never is (atomic writes)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
