"""The request path: every middleware a request passes through, outermost first, in one list (`our_middlewares`).

    Starlette's ServerErrorMiddleware (an unhandled error: 500)
    this project's, in the order of `our_middlewares`:
      1. ApiKeyMiddleware         the key check (only with --api-key, VLLM_API_KEY or --api-keys-file)
      2. BodySizeLimitMiddleware  the body, read once; 413 over its limit
      3. RestartMiddleware        503 while a new engine starts
      4. LimitsMiddleware         the per-request limits, per key concurrency, the queue bound; counts
    vLLM's, as its `build_app` adds them (outermost first): any --middleware, ScalingMiddleware (503 while elastic
      EP scales), XRequestIdMiddleware (--enable-request-id-headers), AuthenticationMiddleware (vLLM's key check:
      left out when ours runs), CORSMiddleware, the Prometheus instrumentator
    Starlette's ExceptionMiddleware, then the router, then vLLM's route.

Which routes each of ours acts on is in one table, server/routes.py. A body is read from the client once, by the
body buffer; the limits reuse it from the scope and vLLM reads its replay.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from streaming_tutorial.server.admission import LimitsMiddleware
from streaming_tutorial.server.keys import KeyRing
from streaming_tutorial.server.restart_hooks import RestartMiddleware
from streaming_tutorial.server.security import ApiKeyMiddleware, BodySizeLimitMiddleware, max_body_bytes_from_env
from streaming_tutorial.server.traffic import count_unauthorized


def our_middlewares(app, keyring: KeyRing | None) -> list[Middleware]:
    """This project's middlewares, outermost first. They use the state `install_limits` (server/admission.py)
    and `install_engine_restart` (server/restart_hooks.py) put on `app.state`."""
    state = app.state
    return [
        # 1. The key check, first: a request without a key is refused before it costs anything (no body read, no
        # limit counted); a request with one carries its key in the scope, whose name the limits count under.
        # It replaces vLLM's key check, which knows only --api-key (not the keys file), reads only the bearer
        # token, and guards only /v1, /v2, /inference and /cohere. Only on a server with keys.
        *([Middleware(ApiKeyMiddleware, keyring=keyring, on_unauthorized=count_unauthorized)]
          if keyring is not None else []),
        # 2. The body buffer: the one place the body is read, inside the key check (no one without a key can make
        # the server hold 16 MiB) and in front of everything that reads it. Over the limit: 413, unparsed.
        Middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes_from_env()),
        # 3. Engine restarts: while a new engine starts, a route that needs it gets a 503 at once. Inside the key
        # check (a request without a key gets its 401 even then), in front of the limits (a request refused now
        # is never counted in flight, nor against its key).
        Middleware(RestartMiddleware, restart=state.tutorial_restart),
        # 4. The limits, innermost of ours, right in front of vLLM: they need the key (the key check) and the
        # body (the buffer), and a request is "in flight" from here to its last byte, which vLLM sends.
        Middleware(LimitsMiddleware, limits=state.tutorial_limits, traffic=state.tutorial_traffic),
    ]


def install_request_path(app, keyring: KeyRing | None) -> None:
    """Put `our_middlewares` in front of vLLM's, vLLM's key check left out when ours runs, and build the stack
    again: vLLM's SageMaker bootstrap had already built it."""
    vllms = [m for m in app.user_middleware if keyring is None or m.cls is not AuthenticationMiddleware]
    app.user_middleware[:] = [*our_middlewares(app, keyring), *vllms]
    app.middleware_stack = app.build_middleware_stack()


def middleware_names(app) -> list[str]:
    """The class names of the app's built middleware stack, outermost first, down to the router."""
    names, layer = [], app.middleware_stack
    while layer is not None and layer is not app.router:
        names.append(type(layer).__name__)
        layer = getattr(layer, "app", None)
    return names
