"""Command line: `mergeserve serve --config FILE` and `mergeserve merge --config FILE --out DIR`.

`python -m server ...` does the same as the console script.

uvicorn binds the port at once and answers /health with 503 while boot runs in a thread; a boot that refuses the
model stops the server and exits with the refusal's code (2 bad input, 3 failed check) and one line on stderr.
SIGTERM or Ctrl-C drains in-flight requests (see server.shutdown) and exits 0. If the model thread dies the server
stops and exits 1 with one line on stderr, so an orchestrator restarts it.

Only argparse and the config module load at start-up: torch, transformers and peft take seconds to import, so they
come in with the command body that needs them, after the config has validated, and `--help`, `--version` and a
config error answer without them (`tests/test_cli_startup.py`, `scripts/bench_cli.py`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from server import __version__
from server.config.load import load_config
from server.config.schema import ConfigError

log = logging.getLogger("mergeserve")
EXIT_UNEXPECTED = 1
EXIT_MERGE_FAILED = 3  # `mergeserve merge` exits 0, 2 (bad input) or 3 (the merge failed), never with a traceback


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line with a fix, like every other refusal (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}; fix: see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="mergeserve", description="Merge LoRA adapters at boot and serve the model with TGI's API."
    )
    parser.add_argument("--version", action="version", version=f"mergeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="boot the model and serve it over HTTP")
    # Containers set these through the environment; a flag given on the command line wins.
    env = os.environ.get
    serve.add_argument(
        "--config", default=env("MERGESERVE_CONFIG"), help="YAML config file (env MERGESERVE_CONFIG; see configs/)"
    )
    serve.add_argument("--host", default=env("MERGESERVE_HOST"), help="override server.host (env MERGESERVE_HOST)")
    serve.add_argument(
        "--port", type=int, default=env("MERGESERVE_PORT"), help="override server.port (env MERGESERVE_PORT)"
    )
    serve.add_argument("--mode", choices=["merged", "unmerged", "ab"], default=env("MERGESERVE_MODE"),
                       help="override mode (env MERGESERVE_MODE)")  # fmt: skip
    serve.add_argument(
        "--cache-dir", default=env("MERGESERVE_CACHE_DIR"), help="override cache.dir (env MERGESERVE_CACHE_DIR)"
    )
    serve.add_argument(
        "--log-level", default=env("MERGESERVE_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    merge = sub.add_parser("merge", help="write the merged model as a Hugging Face checkpoint, without serving")
    merge.add_argument("--config", default=env("MERGESERVE_CONFIG"), help="YAML config file (env MERGESERVE_CONFIG)")
    merge.add_argument("--out", required=True, type=Path, help="new folder for the checkpoint")
    merge.add_argument("--dtype", choices=["auto", "checkpoint", "float32", "float16", "bfloat16"],
                       help="default: model.dtype; auto and checkpoint keep the checkpoint's own")  # fmt: skip
    merge.add_argument("--max-shard-size", default="200MB", help="largest safetensors shard, e.g. 200MB or 5GB")
    merge.add_argument("--log-level", default=env("MERGESERVE_LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"])  # fmt: skip
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    pairs = {
        "server.host": args.host,
        "server.port": args.port,
        "mode": args.mode,
        "cache.dir": str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else None,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def serve(args: argparse.Namespace) -> int:
    if not args.config:
        print("mergeserve: no config given; fix: pass --config FILE or set MERGESERVE_CONFIG", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"mergeserve: {exc}", file=sys.stderr)
        return 2
    import uvicorn  # the config is good: now pay for fastapi, torch and transformers

    from server.boot.boot import boot
    from server.http.app import attach_engine, create_app
    from server.http.shutdown import GracefulServer
    from server.load.adapters import BootError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(None, config)
    # The drain (server.shutdown_grace_seconds) comes first; uvicorn's own timeout only cuts what outlives it.
    uv_config = uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_level=args.log_level, timeout_graceful_shutdown=2
    )

    def engine_death() -> str | None:
        return None if app.state.engine is None else app.state.engine.scheduler.death

    server = GracefulServer(uv_config, app.state.lifecycle, config.server.shutdown_grace_seconds, engine_death)
    failure: list[tuple[str, int]] = []

    def run_boot() -> None:
        try:
            attach_engine(app, boot(config, on_phase=app.state.metrics.observe_boot_phase))
            log.info("ready: serving %s in %s mode on %s:%d", config.model.model_id, config.mode,
                     config.server.host, config.server.port)  # fmt: skip
        except BootError as exc:
            failure.append((str(exc), exc.exit_code))
            server.should_exit = True
        except Exception as exc:  # not a refusal we foresaw: keep the traceback for the bug report
            log.exception("boot failed")
            failure.append((f"boot failed: {type(exc).__name__}: {exc}", EXIT_UNEXPECTED))
            server.should_exit = True

    threading.Thread(target=run_boot, name="boot", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind
        print(
            f"mergeserve: {args.config}: server.port: cannot listen on {config.server.host}:{config.server.port}; "
            "fix: free the port or pass --port",
            file=sys.stderr,
        )
        return 2
    if failure:
        message, code = failure[0]
        print(f"mergeserve: {message}", file=sys.stderr)
        return code
    if server.died is not None:
        print(f"mergeserve: model thread died ({server.died}); exiting so the server is restarted", file=sys.stderr)
        return EXIT_UNEXPECTED
    return 0


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def merge(args: argparse.Namespace) -> int:
    """Offline export; the last line on stdout names the folder, stderr gets one line on a refusal."""
    if not args.config:
        print("mergeserve: no config given; fix: pass --config FILE or set MERGESERVE_CONFIG", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        from server.store.checkpoint import parse_size  # imports torch: only once the config is good

        max_shard = parse_size(args.max_shard_size)
    except ConfigError as exc:
        print(f"mergeserve: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        problem, _, fix = str(exc).partition(" | ")
        print(f"mergeserve: --max-shard-size: {problem}; fix: {fix}", file=sys.stderr)
        return 2
    from server.load.adapters import BootError
    from server.store.export import export_merged

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = export_merged(config, args.out.resolve(), args.dtype, max_shard)
    except BootError as exc:
        print(f"mergeserve: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # not a refusal we foresaw: one line (the contract is 0, 2 or 3), traceback on debug
        log.debug("merge failed", exc_info=True)
        print(f"mergeserve: merge failed: {_one_line(exc)}; fix: check the base and adapter files, and report this "
              "as a bug with the traceback from --log-level debug", file=sys.stderr)  # fmt: skip
        return EXIT_MERGE_FAILED
    peak = "n/a" if result.peak_ratio is None else f"{result.peak_rss_above_baseline / 1e6:.0f} MB"  # type: ignore[operator]
    ratio = "" if result.peak_ratio is None else f" ({result.peak_ratio:.2f}x the model)"
    log.info("export: %d files, %s, %.0f MB of weights, peak memory above baseline %s%s, %.1fs",
             len(result.files), str(result.dtype).removeprefix("torch."), result.model_bytes / 1e6, peak, ratio,
             result.seconds)  # fmt: skip
    print(result.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "merge":
        return merge(args)
    return 2
