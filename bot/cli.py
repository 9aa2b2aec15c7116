"""The `atelier` console script: run, demo, tiny-model PATH, models check, db upgrade.

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
    models = sub.add_parser("models", help="model tools")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("check", help="load every configured model and report")
    db = sub.add_parser("db", help="database tools")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="create or upgrade the database schema")
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
            from engine.tiny import tiny_model_command

            return tiny_model_command(args.path)
        settings = load_settings()
        token = read_token(os.environ) if args.command == "run" else ""
    except ConfigError as exc:
        return _fail(str(exc))
    configure_logging(settings.logging.level)
    if args.command == "run":
        return _run(settings, token)
    if args.command == "demo":
        from bot.demo import run_demo

        return asyncio.run(run_demo(settings, out_dir=args.out))
    if args.command == "models":
        return _models_check(settings)
    if args.command == "db":
        from db.migrate import upgrade

        asyncio.run(upgrade(settings.database.url))
        print(f"database schema is up to date ({_safe_url(settings.database.url)})")
        return 0
    return _fail(f"unknown command {args.command}")


def _run(settings: Settings, token: str) -> int:
    from bot.app import run_bot

    return run_bot(settings, token)


def _models_check(settings: Settings) -> int:
    from engine.models import check_models

    results = check_models(settings.models, settings.engine)
    failed = 0
    for check in results:
        if check.ok:
            print(f"ok     {check.name:<20} {check.seconds:6.1f}s  {check.detail}")
        else:
            failed += 1
            print(f"FAILED {check.name:<20} {check.detail}")
    return 1 if failed else 0


def _safe_url(url: str) -> str:
    """The database URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


if __name__ == "__main__":
    sys.exit(main())
