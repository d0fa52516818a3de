"""How an engine restart (server/engine_restart.py) shows, to students and to vLLM's launcher.

- `RestartMiddleware`: while a new engine starts, every request that needs the engine gets a 503 with Retry-After
  and a message a student understands, at once, instead of vLLM's EngineDeadError; /health's fields say
  "restarting" (`restart_health`, `restart_fields`), and the page shows it.
- `install_restart_hooks`: wraps vLLM's engine-death call (`terminate_if_errored`), so that a death starts a new
  engine instead of stopping the server, and its error responses (`friendly_error`), so that an engine death is
  worded for a student.
- `last_line`: what `main()` logs when restarts were on and the server stopped anyway (a crash loop).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from streaming_tutorial.server.engine_restart import RESTART_WINDOW_S, STOPPING, EngineRestart, restart_wanted
from streaming_tutorial.server.routes import needs_engine, route_path
from streaming_tutorial.server.security import error_body, send_error

_current: EngineRestart | None = None  # this process's server (one per process; in-process tests build several)


class RestartMiddleware:
    """Pure ASGI, in front of the limits (server/request_path.py): while the engine restarts, every request that
    needs it (server/routes.py: all but the probes, metrics, docs and the page) gets a 503 with Retry-After at
    once, instead of vLLM's EngineDeadError."""

    def __init__(self, app: ASGIApp, restart: EngineRestart) -> None:
        self.app, self.restart = app, restart

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.restart.enabled and needs_engine(route_path(scope)):
            if self.restart.unavailable():
                return await send_error(send, 503, error_body(self.restart.message(), "ServiceUnavailableError",
                                                              503), restart_headers(self.restart))
            send = self.with_retry_after(send)
        await self.app(scope, receive, send)

    def with_retry_after(self, send: Send) -> Send:
        """The first request to meet a dead engine is answered by vLLM's exception handler (worded by
        `friendly_error`), which sends no Retry-After: add it to a 503 sent while the engine is unavailable."""
        async def sending(message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 503 and not any(
                    name.lower() == b"retry-after" for name, _ in message.get("headers", [])) \
                    and self.restart.unavailable():
                message = {**message, "headers": [*message.get("headers", []), *restart_headers(self.restart)]}
            await send(message)
        return sending


def restart_headers(restart: EngineRestart) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(restart.retry_after()).encode())]


def install_engine_restart(app, args) -> EngineRestart:
    """Add the restart state to vLLM's app (read by `RestartMiddleware`, which server/request_path.py puts in its
    place)."""
    global _current
    restart = _current = app.state.tutorial_restart = EngineRestart(app, args, restart_wanted(args))
    return restart


def restart_health(app) -> tuple[dict, dict] | None:
    """(/health's fields, its headers) while the engine restarts, else None. Notices a death on the way: the
    page polls /health every second, sooner than vLLM's watchdog (5 s)."""
    restart: EngineRestart | None = getattr(app.state, "tutorial_restart", None)
    if restart is None or not restart.unavailable():
        return None
    return ({"status": "restarting", "error": restart.message(), "engine_restart": restart.health()},
            {"Retry-After": str(restart.retry_after())})


def restart_fields(app) -> dict:
    restart: EngineRestart | None = getattr(app.state, "tutorial_restart", None)
    return {"engine_restart": restart.health()} if restart is not None else {}


def install_restart_hooks(launcher, vllm_error_module, *, restart: bool = True, friendly_errors: bool = True) -> None:
    """Wrap vLLM's engine-death calls (after shutdown.EngineDeathWatch, whose wrapper this one calls when the
    server must stop) and its error responses, wherever vLLM looks them up. Called by the seam (server/seam.py),
    which says whether each holds on this vLLM."""
    from vllm.entrypoints.serve.engine import serving

    for module in (launcher, vllm_error_module) if restart else ():
        original = module.terminate_if_errored

        def guarded(server, engine, _original=original):
            restart = getattr(getattr(server.config.app, "state", None), "tutorial_restart", None)
            if restart is None or not restart.notice():
                _original(server, engine)

        module.terminate_if_errored = guarded
    for module in (serving, vllm_error_module) if friendly_errors else ():  # streams' errors; exception handler
        module.create_error_response = friendly_error(module.create_error_response)


def friendly_error(create_error_response):
    """vLLM's `create_error_response`, with the message of an EngineDeadError ("EngineCore encountered an issue.
    See stack trace (above) for the root cause.": a trace no student can see) replaced by one that says what
    happened and what to do, as a 503."""
    from http import HTTPStatus

    from vllm.v1.engine.exceptions import EngineDeadError

    def create(message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST, param=None):
        if isinstance(message, EngineDeadError):
            return create_error_response(_current.message() if _current else STOPPING, "ServiceUnavailableError",
                                         HTTPStatus.SERVICE_UNAVAILABLE, None)
        return create_error_response(message, err_type, status_code, param)

    return create


def last_line() -> str | None:
    """main()'s last line when restarts were on and the server stopped anyway."""
    if _current is None or _current.status != "stopped":
        return None
    return (f"Server stopped because the engine process died again ({len(_current.deaths)} times within "
            f"{RESTART_WINDOW_S / 60:.0f} minutes, {len(_current.outages)} restart(s)); not restarting it. The "
            "causes are in the log above (e.g. out of memory, or the process was killed).")
