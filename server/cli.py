"""Command line: `mergeserve serve --config FILE`, `mergeserve check --config FILE` and `mergeserve merge --config FILE
--out DIR`.

`python -m server ...` does the same as the console script.

Every refusal is a `MergeserveError`: the CLI prints its `line()` on stderr and exits with its `ExitCode`.
uvicorn binds the port at once and answers /health with 503 while boot runs in a thread; a boot that refuses the
model stops the server and exits with the refusal's code (BAD_INPUT 2, CHECK_FAILED 3). SIGTERM or Ctrl-C drains
in-flight requests (see server.shutdown) and exits OK. If the model thread dies the server stops and exits
UNEXPECTED (1), so an orchestrator restarts it.

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
from server.config.schema import Config
from server.errors import ExitCode, MergeserveError

log = logging.getLogger("mergeserve")


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line with a fix, like every other refusal (argparse prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.BAD_INPUT, f"{self.prog}: {message}; fix: see {self.prog} --help\n")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


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
    serve.add_argument("--dtype", choices=["auto", "checkpoint", "float32", "float16", "bfloat16"],
                       default=env("MERGESERVE_DTYPE"), help="override model.dtype (env MERGESERVE_DTYPE)")  # fmt: skip
    serve.add_argument("--prefix-cache-tokens", type=int, default=env("MERGESERVE_PREFIX_CACHE_TOKENS"),
                       help="override engine.prefix_cache_tokens, 0 turns prompt-prefix reuse off "
                       "(env MERGESERVE_PREFIX_CACHE_TOKENS)")  # fmt: skip
    serve.add_argument("--skip-memory-check", action="store_true", default=_truthy(env("MERGESERVE_SKIP_MEMORY_CHECK")),
                       help="boot even when the estimated peak memory does not fit: engine.memory_check false "
                       "(env MERGESERVE_SKIP_MEMORY_CHECK)")  # fmt: skip
    serve.add_argument(
        "--log-level", default=env("MERGESERVE_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    check = sub.add_parser("check", help="say what serve would do with a config, without loading weights")
    check.add_argument("--config", default=env("MERGESERVE_CONFIG"), help="YAML config file (env MERGESERVE_CONFIG)")
    check.add_argument("--mode", choices=["merged", "unmerged", "ab"], default=env("MERGESERVE_MODE"),
                       help="override mode, as serve's --mode (env MERGESERVE_MODE)")  # fmt: skip
    check.add_argument("--cache-dir", default=env("MERGESERVE_CACHE_DIR"), help="override cache.dir, as serve's")
    check.add_argument("--skip-memory-check", action="store_true", default=_truthy(env("MERGESERVE_SKIP_MEMORY_CHECK")),
                       help="as serve's: report the memory estimate without refusing")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the findings as one JSON object")
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
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "mode": args.mode,
        "model.dtype": getattr(args, "dtype", None) if args.command == "serve" else None,  # merge's --dtype is its own
        "cache.dir": str(Path(args.cache_dir).expanduser().resolve()) if args.cache_dir else None,
        "engine.prefix_cache_tokens": getattr(args, "prefix_cache_tokens", None),
        "engine.memory_check": False if getattr(args, "skip_memory_check", False) else None,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _refuse(exc: MergeserveError) -> ExitCode:
    """The one place a refusal reaches the operator: one line on stderr, and the exit code it names."""
    print(f"mergeserve: {exc.line()}", file=sys.stderr)
    return exc.exit_code


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    if not args.config:
        raise MergeserveError("no config given", "pass --config FILE or set MERGESERVE_CONFIG")
    return load_config(args.config, overrides)


def serve(args: argparse.Namespace) -> ExitCode:
    try:
        config = _load(args, _overrides(args))
    except MergeserveError as exc:
        return _refuse(exc)
    import uvicorn  # the config is good: now pay for fastapi, torch and transformers

    from server.boot.boot import boot
    from server.http.app import attach_engine, create_app
    from server.http.shutdown import GracefulServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(None, config)
    # The drain (server.shutdown_grace_seconds) comes first; uvicorn's own timeout only cuts what outlives it.
    uv_config = uvicorn.Config(
        app, host=config.server.host, port=config.server.port, log_level=args.log_level, timeout_graceful_shutdown=2
    )

    def engine_death() -> str | None:
        return None if app.state.engine is None else app.state.engine.scheduler.death

    server = GracefulServer(uv_config, app.state.lifecycle, config.server.shutdown_grace_seconds, engine_death)
    failure: list[MergeserveError] = []

    def run_boot() -> None:
        try:
            attach_engine(app, boot(config, on_phase=app.state.metrics.observe_boot_phase))
            log.info("ready: serving %s in %s mode on %s:%d", config.model.model_id, config.mode,
                     config.server.host, config.server.port)  # fmt: skip
        except MergeserveError as exc:
            failure.append(exc)
            server.should_exit = True
        except Exception as exc:  # not a refusal we foresaw: keep the traceback for the bug report
            log.exception("boot failed")
            fix = "report this as a bug with the traceback logged above"
            failure.append(MergeserveError(f"boot failed: {_one_line(exc)}", fix, "", ExitCode.UNEXPECTED))
            server.should_exit = True

    threading.Thread(target=run_boot, name="boot", daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn exits this way when it cannot bind
        where = f"{args.config}: server.port"
        listen = f"cannot listen on {config.server.host}:{config.server.port}"
        return _refuse(MergeserveError(listen, "free the port or pass --port", where))
    if failure:
        return _refuse(failure[0])
    if server.died is not None:
        problem = f"model thread died ({server.died}); exiting so the server is restarted"
        return _refuse(MergeserveError(problem, "", "", ExitCode.UNEXPECTED))
    return ExitCode.OK


def merge(args: argparse.Namespace) -> ExitCode:
    """Offline export; the last line on stdout names the folder, stderr gets one line on a refusal.

    Exits OK, BAD_INPUT or CHECK_FAILED (the merge failed, however), never with a traceback.
    """
    try:
        config = _load(args)
        from server.store.checkpoint import parse_size  # imports torch: only once the config is good

        max_shard = parse_size(args.max_shard_size)
    except MergeserveError as exc:
        return _refuse(exc)
    from server.store.export import export_merged

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = export_merged(config, args.out.resolve(), args.dtype, max_shard)
    except MergeserveError as exc:
        return _refuse(exc)
    except Exception as exc:  # not a refusal we foresaw: one line, traceback on debug
        log.debug("merge failed", exc_info=True)
        fix = "check the base and adapter files, and report this as a bug with the traceback from --log-level debug"
        return _refuse(MergeserveError(f"merge failed: {_one_line(exc)}", fix, "", ExitCode.CHECK_FAILED))
    peak = "n/a" if result.peak_ratio is None else f"{result.peak_rss_above_baseline / 1e6:.0f} MB"  # type: ignore[operator]
    ratio = "" if result.peak_ratio is None else f" ({result.peak_ratio:.2f}x the model)"
    log.info("export: %d files, %s, %.0f MB of weights, peak memory above baseline %s%s, %.1fs",
             len(result.files), str(result.dtype).removeprefix("torch."), result.model_bytes / 1e6, peak, ratio,
             result.seconds)  # fmt: skip
    print(result.out)
    return ExitCode.OK


def check(args: argparse.Namespace) -> ExitCode:
    """The report on stdout (or JSON); a refusal also goes to stderr as serve's one line, with serve's exit code."""
    try:
        config = _load(args, _overrides(args))
    except MergeserveError as exc:
        return _refuse(exc)
    import json

    from server.boot.plan import check as plan_check  # imports torch for the cache key; no weights are loaded
    from server.boot.plan import report_lines

    plan = plan_check(config, args.config)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else "\n".join(report_lines(plan)))
    if plan.refusal is not None:
        print(f"mergeserve: {plan.refusal}", file=sys.stderr)
    return ExitCode(plan.exit_code)


def main(argv: list[str] | None = None) -> ExitCode:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "merge":
        return merge(args)
    if args.command == "check":
        return check(args)
    return ExitCode.BAD_INPUT
