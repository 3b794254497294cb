"""The HTTP app: TGI's routes and OpenAI's over one `Engine`, behind the request guard, with app-owned metrics.

`create_app(engine, config)` takes a ready engine (tests inject a tiny one) or None while boot is still running; the
CLI attaches the engine with `attach_engine` when boot finishes. Until then /health answers 503. Routes live in
`server.http.tgi` and `server.http.openai` and read everything from `app.state`, so this module only wires.
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server import __version__
from server.config.inputs import load_api_keys
from server.config.schema import Config
from server.engine.engine import Engine
from server.http import openai, tgi
from server.http.auth import KeyChecker, exposure_notices
from server.http.errors import install_handlers
from server.http.metrics import Metrics
from server.http.middleware import Lifecycle, ModeHeader, RequestGuard
from server.http.serving import ArmChooser, served_adapter


def attach_engine(app: FastAPI, engine: Engine) -> None:
    metrics: Metrics = app.state.metrics
    engine.scheduler.on_step = metrics.observe_step
    app.state.arms = ArmChooser(list(engine.arms), app.state.config.ab)
    app.state.engine = engine
    metrics.engine_ready(engine.info)
    if engine.collector is not None:  # vLLM's own metrics (vllm:*), next to ours on /metrics
        metrics.registry.register(engine.collector)


def _add_middleware(app: FastAPI, config: Config, lifecycle: Lifecycle) -> None:
    sec = config.security
    keys = KeyChecker(load_api_keys(sec))
    for notice in exposure_notices(keys.enabled, sec.metrics_need_key, config.server.host, config.server.port):
        logging.getLogger("mergeserve").warning(notice)
    # Added innermost first: ModeHeader wraps CORS, which wraps the guard, so refusals get both sets of headers.
    app.add_middleware(
        RequestGuard,
        lifecycle=lifecycle,
        keys=keys,
        max_body_bytes=sec.max_body_bytes,
        metrics_need_key=sec.metrics_need_key,
    )
    if sec.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sec.cors_allow_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-merge-mode"],
            expose_headers=["x-merge-mode"],
        )
    app.add_middleware(ModeHeader, mode=config.mode)


def create_app(engine: Engine | None, config: Config) -> FastAPI:
    app = FastAPI(title="mergeserve", version=__version__, description="LoRA adapters merged at boot, served as TGI.")
    app.state.config = config
    app.state.engine = None
    app.state.metrics = Metrics(adapter=served_adapter(config))
    app.state.lifecycle = Lifecycle()
    app.state.started = int(time.time())  # /v1/models' `created`
    if engine is not None:
        attach_engine(app, engine)
    _add_middleware(app, config, app.state.lifecycle)
    install_handlers(app)
    app.include_router(tgi.router)
    app.include_router(openai.router)
    return app
