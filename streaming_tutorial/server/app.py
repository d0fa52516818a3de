"""The app `streaming_server.py` serves: vLLM's own, as its app builder makes it, with this project's parts added.

`create_app` is what vLLM's launcher calls in place of its `build_app`: it adds a JSON `/health`, the classroom
page, the key check, the body-size limit, the shared-server limits and engine restarts, and prints where the
server is once it accepts requests.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from contextlib import asynccontextmanager

from fastapi import Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm import __version__ as VLLM_VERSION
from vllm.entrypoints.serve.exception_handling.handlers.http import http_exception_handler

from streaming_tutorial.server.admission import health_problem, install_limits, limits_health
from streaming_tutorial.server.keys import KeysFileError, keyring_from_args, keys_file_arg
from streaming_tutorial.server.page import mount_page
from streaming_tutorial.server.request_path import install_request_path
from streaming_tutorial.server.restart_hooks import install_engine_restart, restart_fields, restart_health
from streaming_tutorial.server.seam import in_force, vllm_build_app
from streaming_tutorial.server.security import api_keys, non_loopback_warning

logger = logging.getLogger("vllm.streaming_server")  # under "vllm", so it gets vLLM's log format and handler

def create_app(args: Namespace, supported_tasks=None, model_config=None):
    """vLLM's FastAPI app, as `vllm.entrypoints.launchers.app.build_app` builds it, plus our routes."""
    app = vllm_build_app()(args, supported_tasks, model_config)
    # Starlette serves the first route that matches, so ours takes the place of vLLM's empty /health.
    ours = APIRoute("/health", health, methods=["GET"], name="health")
    routes = app.router.routes
    vllm_health = [i for i, route in enumerate(routes) if getattr(route, "path", None) == "/health"]
    if vllm_health:
        routes[vllm_health[0]] = ours
        for i in reversed(vllm_health[1:]):
            del routes[i]
    else:
        routes.insert(0, ours)
    # FastAPI raises Starlette's HTTPException for an unparsable body (e.g. invalid UTF-8) and Starlette's
    # router for unknown paths; vLLM registers its handler only for FastAPI's subclass, so those answered
    # `{"detail": ...}`. Route them through vLLM's handler: every error has vLLM's error shape.
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)
    announce_when_ready(app, args)
    mount_page(app, args)
    # --api-key and --api-keys-file (server/keys.py), as `load_keyring` read them at start; or read here
    # for an app built without `streaming_server.main` (the in-process tests).
    keyring = args.keyring if hasattr(args, "keyring") else keyring_from_args(args)
    install_limits(app, args, model_config, keyring)  # the limits' state (streaming_tutorial/server/admission.py)
    install_engine_restart(app, args)  # a dead engine replaced in place (streaming_tutorial/server/engine_restart.py)
    # What a request gets for the sampling parameters it leaves out (the model's generation config, the output
    # cap on top), as vLLM computes it; shown by /health. Read once: vLLM reads the file on each call.
    app.state.sampling_defaults = model_config.get_diff_sampling_param() if model_config is not None else {}
    # Our middlewares, in front of vLLM's: the key check, the body buffer, restarts, the limits. The list, outermost
    # first, with why each sits where it does, is `our_middlewares` (streaming_tutorial/server/request_path.py).
    install_request_path(app, keyring)
    return app


def announce_when_ready(app, args: Namespace) -> None:
    """Print `ready_banner` once the server accepts requests: vLLM's lifespan has started by then, and the
    socket has been listening since before the engine loaded (vLLM binds it first)."""
    vllm_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app):
        async with vllm_lifespan(app):
            print(ready_banner(args), flush=True)
            yield

    app.router.lifespan_context = lifespan


def ready_banner(args: Namespace) -> str:
    """What a person needs once the server is up: where it is, the page, a first request, the notebooks."""
    if getattr(args, "uds", None):
        return f"\n  Ready on the Unix socket {args.uds}.\n"
    host = args.host or "0.0.0.0"
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"{'https' if args.ssl_certfile else 'http'}://{shown}:{args.port}{args.root_path or ''}"
    model = (args.served_model_name or [args.model])[0]
    keys = api_keys(args) or keys_file_arg(args)
    auth = " -H 'Authorization: Bearer <key>'" if keys else ""
    lines = [f"Ready: {url}",
             *([f"  (listening on {host}: from other machines, use this machine's address)"] if shown != host else []),
             f"  page:      {url}/" + ("  (off: --no-page)" if getattr(args, "no_page", False) else ""),
             f"  try it:    curl -N {url}/v1/chat/completions{auth} \\",
             "               -H 'Content-Type: application/json' -d '{\"model\": "
             f"\"{model}\", \"stream\": true,",
             "               \"messages\": [{\"role\": \"user\", \"content\": \"Say hello\"}]}'",
             "  notebooks: `make lab` finds this server on 127.0.0.1:8000; elsewhere, set",
             f"             TUTORIAL_SERVER_URL={url}" + (" TUTORIAL_API_KEY=<key>" if keys else ""),
             "  stop:      Ctrl-C"]
    width = max(len(line) for line in lines)
    return "\n".join(["", "=" * width, *lines, "=" * width, ""])


async def health(request: Request) -> JSONResponse:
    """Engine health as JSON: 200 `{"status": "healthy", ...}`, or 503 with `"status"` "unhealthy",
    "overloaded" or "restarting", plus the limits and the engine's queue (streaming_tutorial/server/admission.py).

    Cheap enough to poll: it asks vLLM's `check_health()`, which only reports whether the engine has
    already died (vLLM's watchdog then stops the whole server within seconds; with restarts on, a new engine
    starts instead, and meanwhile this says "restarting": streaming_tutorial/server/engine_restart.py), then whether
    new requests would be refused now (a full queue: "overloaded") or the engine has had requests but produced
    nothing for a minute ("unhealthy"). A request that streams tokens remains the final proof.
    """
    state = request.app.state
    args = state.args
    body = {
        "model": (args.served_model_name or [args.model])[0],
        "vllm_version": VLLM_VERSION,
        "device": state.vllm_config.device_config.device_type,
        "max_model_len": state.vllm_config.model_config.max_model_len,
        "sampling_defaults": getattr(state, "sampling_defaults", {}),
        "patches": in_force(),  # the patches of vLLM this server put in place (server/seam.py, docs/seam.md)
        **limits_health(request.app),
        **restart_fields(request.app),
    }
    if restarting := restart_health(request.app):  # a new engine is starting: 503 "restarting", Retry-After
        fields, headers = restarting
        return JSONResponse({**fields, **body}, status_code=503, headers=headers)
    try:
        await state.engine_client.check_health()
    except Exception as error:  # EngineDeadError, or anything else that means "cannot serve"
        return JSONResponse({"status": "unhealthy", "error": f"{type(error).__name__}: {error}", **body},
                            status_code=503)
    if problem := health_problem(request.app):  # a full queue (new requests get 503) or a stalled engine
        status, reason = problem
        return JSONResponse({"status": status, "error": reason, **body}, status_code=503)
    return JSONResponse({"status": "healthy", **body})


def load_keyring(args: Namespace):
    """Read --api-key and --api-keys-file once, before the engine loads (`create_app` reuses the result through
    `args.keyring`): a malformed keys file stops the server here, with one line that names it. Logs the key
    names, and warns when a server without keys listens beyond this machine."""
    try:
        keyring = keyring_from_args(args)
    except (OSError, KeysFileError) as error:
        raise SystemExit(f"error: --api-keys-file: {error}") from None
    if keyring is not None:
        logger.info("API keys: %d (%s)", len(keyring), ", ".join(k.name for k in keyring.keys))
    if warning := non_loopback_warning(args.host, [k.name for k in keyring.keys] if keyring else [],
                                       getattr(args, "uds", None)):
        logger.warning(warning)
    args.keyring = keyring
    return keyring
