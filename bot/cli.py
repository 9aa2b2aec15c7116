"""The `atelier` console script: run, demo, tiny-model PATH, models check, db upgrade, engine serve.

Configuration and token problems are reported as exactly one line on stderr with exit code 2,
before logging is configured, so an operator never has to read a traceback to fix a typo.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from config.settings import ConfigError, Settings, load_settings, read_token

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atelier", description="Atelier: an SDXL image studio on Discord")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the bot on Discord (needs DISCORD_TOKEN)")
    demo = sub.add_parser("demo", help="play a scripted session offline against the built-in sandbox")
    demo.add_argument("--out", default="demo-out", help="where images and the HTML transcript go")
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight SDXL (for tests and the demo)")
    tiny.add_argument("path")
    tiny.add_argument(
        "--full-size",
        action="store_true",
        help="the real SDXL base + refiner architecture instead (random weights, 11.5 GB; built on the GPU if any)",
    )
    models = sub.add_parser("models", help="model tools")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("check", help="load every configured model and report")
    db = sub.add_parser("db", help="database tools")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create or upgrade the database schema")
    engine = sub.add_parser("engine", help="engine tools")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    serve = engine_sub.add_parser(
        "serve", help='deploy (or update) the engine replicas on a Ray cluster for [engine] backend = "ray"'
    )
    serve.add_argument("--address", default="", help="Ray cluster address (default: engine.ray_address, else auto)")
    serve.add_argument("--replicas", type=int, default=0, help="replicas, one per GPU (default: engine.ray_replicas)")
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(message: str) -> int:
    print(f"atelier: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "tiny-model":
            if args.full_size:
                from engine.fullsize import fullsize_model_command

                return fullsize_model_command(args.path)
            from engine.tiny import tiny_model_command

            return tiny_model_command(args.path)
        settings = load_settings()
        token = read_token(os.environ) if args.command == "run" else ""
        # Read once, then gone from the environment: the engine process, Ray workers and anything
        # else this process starts never inherit the bot's credentials.
        os.environ.pop("DISCORD_TOKEN", None)
    except ConfigError as exc:
        return _fail(str(exc))
    configure_logging(settings.logging.level)
    if args.command == "run":
        return _run(settings, token)
    if args.command == "demo":
        from studio.demo import run_demo

        return asyncio.run(run_demo(settings, out_dir=args.out))
    if args.command == "models":
        return _models_check(settings)
    if args.command == "db":
        from db.migrate import upgrade

        asyncio.run(upgrade(settings.database.url))
        print(f"database schema is up to date ({_safe_url(settings.database.url)})")
        return 0
    if args.command == "engine":
        return _engine_serve(settings, address=args.address, replicas=args.replicas)
    return _fail(f"unknown command {args.command}")


def _run(settings: Settings, token: str) -> int:
    from bot.app import run_bot

    return run_bot(settings, token)


def _models_check(settings: Settings) -> int:
    from engine.model_check import check_models
    from engine.styles import Catalog
    from engine.styling import Styling

    # Every LoRA, draft adapter and embedding is loaded into each model it is configured for.
    styling = Styling(Catalog.from_settings(settings), settings.engine.lora_cache_mb)
    results = check_models(settings.models, settings.engine, also=styling.checks_for)
    if settings.controlnets:
        from engine.control import check_controlnets

        results += check_controlnets(settings.models, settings.default_model, settings.engine, settings.controlnets)
    failed = 0
    for check in results:
        if check.ok:
            print(f"ok     {check.name:<20} {check.seconds:6.1f}s  {check.detail}")
        else:
            failed += 1
            print(f"FAILED {check.name:<20} {check.detail}")
    return 1 if failed else 0


def _engine_serve(settings: Settings, *, address: str, replicas: int) -> int:
    """`atelier engine serve`: deploy the Serve application on a running Ray cluster and return
    once its replicas have loaded the models; the application keeps running in the cluster."""
    try:
        import ray
    except ImportError:
        return _fail("engine serve needs Ray: pip install '.[ray]'")
    from engine.ray_client import remote_without_auth
    from engine.ray_serve import deploy, replica_states

    if replicas < 0:
        return _fail("--replicas must be at least 1")
    if replicas:
        engine = settings.engine.model_copy(update={"ray_replicas": replicas})
        settings = settings.model_copy(update={"engine": engine})
    # A private Ray would die with this command: serve needs a cluster (`ray start --head`).
    address = address or settings.engine.ray_address or "auto"
    app = settings.engine.ray_app
    problem = remote_without_auth(address, os.environ)
    if problem is not None:
        return _fail(problem)
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as exc:  # no cluster there (ConnectionError), or a version mismatch
            return _fail(f"cannot join the Ray cluster at {address!r}: {exc} (start one with `ray start --head`)")
    print(f"deploying {settings.engine.ray_replicas} engine replica(s) as Serve application {app!r}...", flush=True)
    try:
        deploy(settings)
    except Exception as exc:
        print(f"atelier: the deployment failed: {exc}", file=sys.stderr)
        return 1
    status, states = replica_states(app)
    running = states.get("RUNNING", 0)
    print(f"engine application {app!r} {status.lower()}: {running}/{settings.engine.ray_replicas} replicas running")
    return 0


def _safe_url(url: str) -> str:
    """The database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
