"""``recsys-embed``: the command line. The CLI talks to people; the library only logs.

Commands: run, backtest, ingest, init, generate, bench, recommend, similar, serve, ui.
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


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    from recsys_embed import progress

    # progress bars: never under --quiet; otherwise on an interactive terminal only (--verbose keeps them)
    progress.set_enabled(False if args.quiet else None)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging.getLevelName(max(level, logging.INFO)))
    # The ephemeral server's telemetry heartbeat can only fail offline, and it races the server's own
    # SQLite writes ("database is locked" tracebacks): keep it off unless the user turned it on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral server's 20 s start budget is not enough on a busy 2-core machine (measured: a timeout while
    # other jobs ran); waiting longer costs nothing when it starts fast.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # ...and again on the way out: some set their own level on import (Lightning: INFO), after this runs
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
    # MLflow configures its own handler when imported, at MLFLOW_LOGGING_LEVEL (default INFO: "Creating initial
    # MLflow database tables..."); its upload/download bars follow our rule for bars.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not progress.enabled():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.quiet:
        # what a user can act on stays (our DataWarning, config errors); library chatter about its own internals
        # (deprecations, "consider increasing num_workers", ...) does not
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", module=r"(pytorch_lightning|lightning_fabric|torch|mlflow|prefect)\b")


_NOISY = ("alembic", "mlflow", "urllib3", "distributed", "httpx", "pytorch_lightning", "lightning_fabric")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drop the INFO chatter of noisy libraries (GPU/TPU availability, tips) whatever level they set themselves."""
    return record.levelno >= logging.WARNING or not record.name.startswith(_NOISY)


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"pipeline YAML (default: {DEFAULT_CONFIG})")
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
    print(report.format())
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


def cmd_recommend(args: argparse.Namespace) -> int:
    from recsys_embed.serving.answer import recommend_for_user

    if args.from_registry:
        from recsys_embed.config import load_config, load_mlflow_settings, registered_name
        from recsys_embed.serving.registry import recommend

        settings = load_mlflow_settings(args.mlflow_config)
        name = registered_name(load_config(args.config, args.overrides), settings)  # this pipeline's model
        out = recommend(settings, [args.user], args.k, args.alias, name).iloc[0]
        if not len(out["item_ids"]):
            raise RecsysEmbedError(f"user {args.user!r} is unknown to {name}@{args.alias}")
        print(f"Top {len(out['item_ids'])} for user {args.user} ({name}@{args.alias}):")
        if out.get("source") == "fallback":
            print("  (popularity fallback: the model has no history of this user)")
        for rank, (item, score) in enumerate(zip(out["item_ids"], out["scores"], strict=True), 1):
            print(f"  {rank:>2}. {item!s:<12} {score:8.4f}")
        return 0
    manifest = _latest(args)
    print(recommend_for_user(manifest, args.user, args.k, args.model, args.explain))
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from recsys_embed.serving.answer import similar_to_item

    manifest = _latest(args)
    print(similar_to_item(manifest, args.item, args.k, args.model))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_config_first(args)
    from flows.api import require_server

    require_server("recsys-embed serve")  # refuses within seconds when there is no server to serve against
    from flows.deploy import serve

    serve(args.config, args.overrides, args.mlflow_config, run_once=args.run_once)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from recsys_embed.config import load_mlflow_settings
    from recsys_embed.tracking.tracker import redact_uri, resolve_settings

    settings = resolve_settings(load_mlflow_settings(args.mlflow_config))
    print(f"MLflow UI for {redact_uri(settings.tracking_uri)} at http://{args.host}:{args.port}")
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
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys-embed", description=__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and results only")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--mlflow-config", default="mlflow.yml", help="MLflow settings (default: mlflow.yml)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline (Prefect flow) and print the summary")
    _config_arg(r)
    r.add_argument("--force", action="store_true", help="incremental runs: run even when no log file is new")
    r.set_defaults(fn=cmd_run)

    bt = sub.add_parser("backtest", help="run the pipeline on the log before a cutoff, score its tables on what "
                        "happened after, side by side with popularity and hand-glued implicit ALS")  # fmt: skip
    _config_arg(bt)
    when = bt.add_mutually_exclusive_group(required=True)
    when.add_argument("--holdout-days", type=int, metavar="N", help="cutoff = the last kept event - N days")
    when.add_argument("--cutoff", type=_date, metavar="DATE", help="cutoff date or time (ISO, e.g. 2011-10-01)")
    bt.add_argument("--per-model", action="store_true", help="score every model refitted with its configured and "
                    "with its tuned parameters (a second pipeline run, with the search off)")  # fmt: skip
    bt.set_defaults(fn=cmd_backtest)

    i = sub.add_parser("ingest", help="ingest the log only and print the row accounting")
    _config_arg(i)
    i.set_defaults(fn=cmd_ingest)

    ini = sub.add_parser("init", help="sniff your own log and write configs/<name>.yaml for it (then: run --config)")
    ini.add_argument("log_path", metavar="LOG_PATH", help="a file, a glob ('logs/*.csv.gz') or a partitioned folder")
    ini.add_argument("--name", help="pipeline name: configs/<name>.yaml, outputs/<name>/ (default: from LOG_PATH)")
    ini.add_argument("--force", action="store_true", help="overwrite an existing configs/<name>.yaml")
    ini.add_argument("--format", default="auto", choices=["auto", "csv", "parquet", "ndjson"])
    for role in ("user", "item", "timestamp", "event-type"):
        ini.add_argument(f"--{role}", metavar="COLUMN", help=f"the {role} column, when the guess is wrong")
    ini.add_argument("--config-dir", default="configs", help="where the config goes (default: configs)")
    ini.set_defaults(fn=cmd_init)

    gen = sub.add_parser("generate", help="write a seeded synthetic log (hive-partitioned Parquet)")
    gen.add_argument("--preset", default="1m", help="tiny | 1m | 20m | 100m")
    gen.add_argument("--out", required=True)
    gen.add_argument("--events", type=int)
    gen.add_argument("--users", type=int)
    gen.add_argument("--items", type=int)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="run benchmark suites and print measured ratios side by side")
    b.add_argument("suites", nargs="*", default=["ingest", "als", "topk"],
                   help="ingest | als | topk | lightning | e2e | ann | scaling (scaling uses --sizes)")  # fmt: skip
    b.add_argument("--size", default="1m", help="tiny | 1m | 20m | 100m")
    b.add_argument("--sizes", default="tiny,1m", help="scaling: comma-separated sizes, e.g. 1m,20m,100m (100m is "
                   "skipped with a message when memory would not allow it)")  # fmt: skip
    b.add_argument("--logs", default="ratings,pairs,counts,retail",
                   help="generalization: comma-separated logs (ratings, pairs, counts, retail)")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", default="bench_results/results.json")
    b.set_defaults(fn=cmd_bench)

    rec = sub.add_parser("recommend", help="top-k for one user from the latest run")
    _config_arg(rec)
    rec.add_argument("--user", required=True)
    rec.add_argument("-k", type=int, default=10)
    rec.add_argument("--model", default=None, help="default: the run's best model")
    rec.add_argument("--explain", action="store_true", help="show the history items behind each recommendation")
    rec.add_argument("--from-registry", action="store_true", help="answer from the registered model (MLflow)")
    rec.add_argument("--alias", default="champion", help="registry alias with --from-registry (default: champion)")
    rec.set_defaults(fn=cmd_recommend)

    sim = sub.add_parser("similar", help="items similar to one item from the latest run")
    _config_arg(sim)
    sim.add_argument("--item", required=True)
    sim.add_argument("-k", type=int, default=10)
    sim.add_argument("--model", default=None)
    sim.set_defaults(fn=cmd_similar)

    srv = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment on the configured cron schedule")
    _config_arg(srv)
    srv.add_argument("--run-once", action="store_true", help="execute the runs due now, then exit (for tests/cron)")
    srv.set_defaults(fn=cmd_serve)

    ui = sub.add_parser("ui", help="open the MLflow UI on the configured store")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(fn=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        return int(args.fn(args))
    except RecsysEmbedError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]  # one line, no traceback
        print(f"error: {' '.join([*lines[:1], '; '.join(lines[1:])]).strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
