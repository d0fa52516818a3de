"""What each route of the app is, in one table: who may call it without a key, whether it needs the engine, and
whether it runs inference. The key check (security.py), engine restarts (restart_hooks.py) and the limits
(admission.py) all read it; request_path.py lists those middlewares in order.

vLLM's own key check guards only paths that start with `/v1`, `/v2`, `/inference` or `/cohere`, which leaves
`/invocations` and `/generative_scoring` (both run inference), `/scale_elastic_ep` (an admin action), `/tokenize`,
`/detokenize` and `/kv_event_sources` open; here a route is open only if this table opens it. A route the table
does not list (one a later vLLM adds, or another task's: embeddings, scoring, ...) fails closed: it needs a key,
needs the engine, and a POST to it is checked and counted as inference. tests/test_request_path.py fails when
the app serves a route the table does not list, so someone decides what it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.types import Scope

GET_HEAD = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Route:
    # The methods anyone may call without a key (the key check lets them through); others need a key.
    open_methods: frozenset[str] = frozenset()
    # Answers only with a working engine: while a new engine starts it gets a 503 with Retry-After at once.
    needs_engine: bool = True
    # Its POST hands work to the engine's queue: the per-request limits check its body, and it counts as one of
    # its key's requests in flight, with its tokens.
    runs_inference: bool = False
    # For an inference route: where its size lives in the body (request_checks.py checks by field name).
    note: str = ""


# Read-only and harmless: liveness and load probes, the vLLM version, Prometheus metrics (scrapers rarely carry
# bearer tokens; counts and latencies only, no prompts), the OpenAPI docs (vLLM's public API, nothing about this
# server's data), and the classroom page's static files (no secret: the user pastes the key into the page).
# None needs the engine, so they answer while a new one starts (the page keeps polling /health and /metrics).
PUBLIC = Route(open_methods=GET_HEAD, needs_engine=False)
# Needs a key and the engine, runs no inference: models, tokenizing, rendering, admin actions, cancellation.
KEYED = Route()
# A route this table does not list: fails closed.
UNLISTED = Route(runs_inference=True)


def inference(note: str) -> Route:
    return Route(runs_inference=True, note=note)


ROUTES: dict[str, Route] = {
    # ---- no key, no engine ----
    "/health": PUBLIC,
    "/version": PUBLIC,
    "/load": PUBLIC,
    "/metrics": PUBLIC,
    "/metrics/": PUBLIC,
    "/openapi.json": PUBLIC,
    "/docs": PUBLIC,
    "/docs/oauth2-redirect": PUBLIC,
    "/redoc": PUBLIC,
    "/": PUBLIC,  # the classroom page (page.py)
    "/page/{file:path}": PUBLIC,  # its files
    # SageMaker's liveness probe (it pings with POST too): no key, but it asks the engine.
    "/ping": Route(open_methods=GET_HEAD | {"POST"}),
    # The page's race: a key, but no engine and no inference of its own: each lane comes back through the whole
    # app as a /v1/chat/completions request, which the checks and the per-key limit then see one by one.
    "/page/race": Route(needs_engine=False),
    # ---- a key and the engine: inference (every POST route of vLLM 0.32's generate task that feeds the engine) ----
    "/v1/chat/completions": inference("n, max_tokens/max_completion_tokens, logprobs/top_logprobs/prompt_logprobs"),
    "/v1/chat/completions/batch": inference("messages is a list of conversations (a batch); n must be 1"),
    "/v1/completions": inference("prompt may be a list of prompts (a batch); n, max_tokens, logprobs, "
                                 "prompt_logprobs"),
    "/v1/responses": inference("max_output_tokens, top_logprobs"),
    "/v1/messages": inference("max_tokens (required)"),
    "/invocations": inference("SageMaker: dispatched by the body's shape to chat, completions, ...: the same "
                              "fields"),
    "/inference/v1/generate": inference("token ids; sampling_params.{n, max_tokens, logprobs, prompt_logprobs}"),
    "/generative_scoring": inference("items (one prompt each, a batch); label_token_ids (logprobs)"),
    "/v1/systemone": inference("structured decisions: one short read per question (a batch)"),
    # ---- a key and the engine, no inference: nothing joins the engine's queue ----
    "/v1/models": KEYED,
    "/kv_event_sources": KEYED,
    "/tokenize": KEYED,
    "/detokenize": KEYED,
    "/v1/messages/count_tokens": KEYED,
    "/v1/chat/completions/render": KEYED,
    "/v1/messages/render": KEYED,
    "/v1/completions/render": KEYED,
    "/v1/responses/render": KEYED,
    "/v1/chat/completions/derender": KEYED,
    "/v1/completions/derender": KEYED,
    "/v1/responses/{response_id}": KEYED,  # GET: a stored response
    "/v1/responses/{response_id}/cancel": KEYED,
    "/inference/v1/abort_requests": KEYED,
    "/scale_elastic_ep": KEYED,
    "/is_scaling_elastic_ep": KEYED,
}

INFERENCE_ROUTES = frozenset(path for path, route in ROUTES.items() if route.runs_inference)


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex for a Starlette path template: `{name}` is one path segment, `{name:path}` any rest."""
    pattern = re.sub(r"\\\{(\w+):path\\\}", ".*", re.escape(template))
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", pattern) + "$")


TEMPLATES = [(template_pattern(path), route) for path, route in ROUTES.items() if "{" in path]


def route(path: str) -> Route:
    """The table's entry for a request's path (as `route_path` gives it): exact first, then the templates."""
    if (found := ROUTES.get(path)) is not None:
        return found
    return next((route for pattern, route in TEMPLATES if pattern.match(path)), UNLISTED)


def route_path(scope: Scope) -> str:
    """The path a request asks for, without `--root-path` (as vLLM's own key check compares it)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


def is_open_route(path: str, method: str) -> bool:
    """Whether anyone may call it without a key."""
    return method in route(path).open_methods


def runs_inference(path: str, method: str) -> bool:
    """Whether the limits check and count it."""
    return method == "POST" and route(path).runs_inference


def needs_engine(path: str) -> bool:
    """Whether it gets a 503 while a new engine starts."""
    return route(path).needs_engine
