"""What one request may ask of a shared server: the limits of `streaming_server.py`, checked on its JSON body.

vLLM 0.32 has no per-client limits: one chat request with `"n": 16000`, or a completion with 1,000 prompts, fills
the engine for minutes while everyone else waits. These checks run on the JSON body of every route that runs
inference (the route table says which: server/routes.py), before anything reaches the engine (server/admission.py
calls them); over a limit the answer is a 400 in vLLM's error shape naming the parameter and the limit:
sequences per request (`n`, `best_of`, and n × prompts), output tokens (`max_tokens`, `max_completion_tokens`,
`max_output_tokens`; also the default when a request gives none, through vLLM's own generation-config
mechanism: `cap_default_output_tokens`), prompts per request (a list `prompt`, a batch of conversations,
scoring `items`), and logprobs (`logprobs`, `top_logprobs`, `prompt_logprobs`, `label_token_ids`) within
vLLM's `--max-logprobs`. Pure functions of the body and the flags: nothing here knows what else is running.

Every flag has an environment variable (for `make serve`); 0 turns a limit off.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from streaming_tutorial.server.keys import KEYS_FILE_ENV

# ---- the flags ----

# (flag, environment variable, default, help). The defaults suit a shared workshop server on the bundled model
# and leave every existing test and notebook unchanged (none asks for more).
FLAGS = {
    # n > 1 multiplies the work of a request (vLLM accepts n up to 16384, each a sequence of its own).
    "max_seqs_per_request": ("--max-seqs-per-request", "TUTORIAL_MAX_SEQS_PER_REQUEST", 4,
                             "Most sequences one request may start: n, best_of, and n × prompts."),
    # A cap, not the default: vLLM's default for a request without one is min(the model's generation-config
    # default, this cap). On a small CPU, 1024 tokens is most of a minute of one stream.
    "max_output_tokens": ("--max-output-tokens", "TUTORIAL_MAX_OUTPUT_TOKENS", 1024,
                          "Most output tokens per request (max_tokens and its aliases), also when a request "
                          "gives none."),
    # vLLM takes up to 1,024 prompts in one /v1/completions request (VLLM_MAX_COMPLETION_PROMPTS).
    "max_prompts_per_request": ("--max-prompts-per-request", "TUTORIAL_MAX_PROMPTS_PER_REQUEST", 4,
                                "Most prompts in one request (a list `prompt`, a batch of conversations, scoring "
                                "items, decision questions)."),
    # A student runs a notebook, perhaps a second one, and the page's 4-lane race: 4 is enough for one person.
    "max_requests_per_key": ("--max-requests-per-key", "TUTORIAL_MAX_REQUESTS_PER_KEY", 4,
                             "Most inference requests in flight per API key (a keys-file line `name:key:N` "
                             "overrides it for that key); more get a 429. No effect without keys."),
    # See Traffic.full (server/traffic.py) for the rule and why 64.
    "max_waiting": ("--max-waiting", "TUTORIAL_MAX_WAITING", 64,
                    "Refuse new requests (503) while the engine's queue holds at least this many waiting "
                    "sequences and at least as many as are running."),
}



def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: {name}={value!r} is not a whole number") from None


def add_limit_args(parser) -> None:
    """Add this server's limit flags (and `--api-keys-file`) to vLLM's parser, defaults from the environment."""
    group = parser.add_argument_group("shared-server limits (streaming_server.py; 0 turns a limit off)")
    for dest, (flag, env, default, help_) in FLAGS.items():
        group.add_argument(flag, dest=dest, type=int, default=env_int(env, default),
                           help=f"{help_} Default: {default}; environment: {env}.")
    group.add_argument("--api-keys-file", dest="api_keys_file", default=os.environ.get(KEYS_FILE_ENV) or None,
                       metavar="PATH",
                       help="A file of API keys, one `name:key` or `name:key:N` per line (N: this key's "
                            "requests in flight); re-read within a second of a change. Adds to --api-key. "
                            f"Environment: {KEYS_FILE_ENV}.")


@dataclass
class Limits:
    max_seqs_per_request: int = 4
    max_output_tokens: int = 1024
    max_prompts_per_request: int = 4
    max_requests_per_key: int = 4
    max_waiting: int = 64
    max_logprobs: int = 20  # vLLM's --max-logprobs; -1 means no limit

    @classmethod
    def from_args(cls, args) -> Limits:
        values = {dest: getattr(args, dest, default) for dest, (_, _, default, _) in FLAGS.items()}
        for dest, value in values.items():
            if value is None or value < 0:
                raise SystemExit(f"error: {FLAGS[dest][0]} must be 0 (off) or more, got {value}")
        return cls(**values, max_logprobs=getattr(args, "max_logprobs", 20))

    def public(self) -> dict:
        """What /health shows."""
        return {"max_seqs_per_request": self.max_seqs_per_request, "max_output_tokens": self.max_output_tokens,
                "max_prompts_per_request": self.max_prompts_per_request,
                "max_requests_per_key": self.max_requests_per_key, "max_waiting": self.max_waiting,
                "max_logprobs": self.max_logprobs}


# ---- the per-request checks ----

INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def as_int(value: Any) -> int | None:
    """The integer pydantic (lax mode) would make of `value`, or None when it is not one (vLLM then answers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INT_TEXT.fullmatch(value):
        return int(value)
    return None


@dataclass
class Violation:
    param: str
    message: str


def prompt_count(path: str, body: dict) -> tuple[str, int]:
    """(the parameter that holds the prompts, how many prompts the request has)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return "prompt", len(prompt)  # a list of strings or of token-id lists (a list of ints is one prompt)
    messages = body.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, list) for m in messages):
        return "messages", len(messages)  # /v1/chat/completions/batch: a list of conversations
    if isinstance(body.get("items"), list):
        return "items", len(body["items"])  # /generative_scoring
    if isinstance(body.get("questions"), dict):
        return "questions", len(body["questions"])  # /v1/systemone
    return "prompt", 1


def request_sequences(body: Any) -> int:
    """How many engine sequences a (valid) request starts: n (or best_of) × prompts."""
    if not isinstance(body, dict):
        return 1
    places = [body, body["sampling_params"]] if isinstance(body.get("sampling_params"), dict) else [body]
    n = max([1, *(as_int(p.get(f)) or 1 for p in places for f in ("n", "best_of"))])
    return n * prompt_count("", body)[1]


def check_request(path: str, body: Any, limits: Limits) -> Violation | None:
    """The first limit the request's body is over, or None. Values of the wrong type are left to vLLM."""
    if not isinstance(body, dict):
        return None
    sp = body.get("sampling_params")
    places = [(body, ""), (sp, "sampling_params.")] if isinstance(sp, dict) else [(body, "")]

    seqs = limits.max_seqs_per_request
    n = 1
    for where, prefix in places:
        for name in ("n", "best_of"):
            value = as_int(where.get(name))
            if value is None:
                continue
            n = max(n, value)
            if seqs and value > seqs:
                return Violation(prefix + name, f"`{prefix + name}` = {value} is over this server's limit of "
                                                f"{seqs} sequences per request: ask for at most {seqs}.")
    param, prompts = prompt_count(path, body)
    if limits.max_prompts_per_request and prompts > limits.max_prompts_per_request:
        cap = limits.max_prompts_per_request
        return Violation(param, f"`{param}` holds {prompts} prompts; this server takes at most {cap} per "
                                f"request: send them in several requests.")
    if seqs and n * prompts > seqs:
        return Violation("n", f"n × prompts = {n} × {prompts} = {n * prompts} sequences is over this server's "
                              f"limit of {seqs} sequences per request.")

    cap = limits.max_output_tokens
    if cap:
        for where, prefix in places:
            for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                value = as_int(where.get(name))
                if value is not None and value > cap:
                    return Violation(prefix + name, f"`{prefix + name}` = {value} is over this server's limit "
                                                    f"of {cap} output tokens per request.")

    most = limits.max_logprobs
    if most != -1:
        for where, prefix in places:
            for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
                value = as_int(where.get(name))  # chat's boolean `logprobs` is not a number: skipped
                if value is not None and (value > most or value == -1):
                    asked = "all" if value == -1 else str(value)
                    return Violation(prefix + name, f"`{prefix + name}` = {asked} is over this server's limit "
                                                    f"of {most} logprobs per token (--max-logprobs).")
        labels = body.get("label_token_ids")
        if isinstance(labels, list) and len(labels) > most:
            return Violation("label_token_ids", f"`label_token_ids` has {len(labels)} ids; this server returns "
                                                f"at most {most} logprobs per token (--max-logprobs).")
    return None


def cap_default_output_tokens(model_config, cap: int) -> None:
    """Make vLLM's own default `max_tokens` (for a request that gives none) at most `cap`.

    vLLM takes that default from the model's generation config (`max_new_tokens`; the bundled model's is 512),
    with `--override-generation-config` on top, and a `max_new_tokens` set there also clamps every request
    (`override_max_tokens`, on chat, completions, responses, messages through chat, /inference/v1/generate). The
    serving objects read it when they are created, after `create_app`; so where the model's default is above
    the cap (or absent: up to the whole context) we set the override to the cap."""
    if model_config is None or not cap:
        return
    default = model_config.get_diff_sampling_param().get("max_tokens")
    if default is None or default > cap:
        model_config.override_generation_config = {**model_config.override_generation_config,
                                                   "max_new_tokens": cap}
