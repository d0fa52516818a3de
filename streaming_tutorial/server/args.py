"""The server's command line: vLLM's own API-server parser, with this server's defaults and flags added.

Every vLLM flag passes through unchanged. Added: the page (server/page.py), the shared-server limits
(server/request_checks.py), engine restarts (server/engine_restart.py), and repeated `--api-key`. Defaults: the
bundled model on 127.0.0.1:8000 with its tool-call parser, and on a CPU the measured defaults of
server/cpu_defaults.py.
"""

from __future__ import annotations

from argparse import Namespace

from vllm.utils.argparse_utils import FlexibleArgumentParser

from streaming_tutorial.model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME
from streaming_tutorial.server.cpu_defaults import apply_cpu_flag_defaults, cpu_flag_defaults
from streaming_tutorial.server.engine_restart import add_restart_args
from streaming_tutorial.server.keys import merge_repeated_api_key
from streaming_tutorial.server.page import add_page_args
from streaming_tutorial.server.request_checks import add_limit_args
from streaming_tutorial.server.seam import cli_args

make_arg_parser = cli_args("make_arg_parser")  # vLLM's, wherever this vLLM keeps it (moved in 0.34)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

# The bundled model's tool-call parser: SmolLM2 was trained on `<tool_call>[{"name": ..., "arguments": ...}]`,
# xLAM's format. Applied with --enable-auto-tool-choice unless either tool flag is given.
BUNDLED_MODEL_TOOL_CALL_PARSER = "xlam"


def make_parser():
    """vLLM's own API-server argument parser, with this server's defaults."""
    parser = make_arg_parser(FlexibleArgumentParser(
        description="vLLM's OpenAI-compatible server with a JSON /health. Every vLLM flag is accepted."))
    defaults = {"model": str(DEFAULT_MODEL_DIR), "host": DEFAULT_HOST, "port": DEFAULT_PORT}
    parser.set_defaults(**defaults, **cpu_flag_defaults())
    add_page_args(parser)
    add_limit_args(parser)
    add_restart_args(parser)
    merge_repeated_api_key(parser)  # `--api-key K1 --api-key K2` keeps both (vLLM keeps only K2)
    return parser


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = make_parser()
    parser.set_defaults(enable_auto_tool_choice=None)  # None: not given, so --no-enable-auto-tool-choice shows
    parser.set_defaults(long_prefill_token_threshold=None)  # None: not given (0 is vLLM's "no cap")
    args = parser.parse_args(argv)
    if args.model_tag:  # `streaming_server.py MODEL`, as in `vllm serve MODEL`
        args.model = args.model_tag
    if args.model == str(DEFAULT_MODEL_DIR) and not args.served_model_name:
        args.served_model_name = [DEFAULT_MODEL_NAME]
    if args.model == str(DEFAULT_MODEL_DIR) and args.tool_call_parser is None and args.enable_auto_tool_choice is None:
        # vLLM loads a tool parser only with auto tool choice on; without one, a named or "required" tool_choice
        # is a 400. The bundled model's tool format is xLAM's (notebook 06 measures what it costs).
        args.tool_call_parser, args.enable_auto_tool_choice = BUNDLED_MODEL_TOOL_CALL_PARSER, True
    args.enable_auto_tool_choice = bool(args.enable_auto_tool_choice)
    apply_cpu_flag_defaults(args)
    return args
