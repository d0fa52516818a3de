"""2 (or N) `streaming_server.py` replicas behind vLLM's router on this machine, until Ctrl-C.

    make cluster                                   # or: .venv/bin/python scripts/cluster.py [vLLM flags]
    make cluster ARGS="--replicas 3 --policy cache_aware --api-key secret"

Starts the replicas one after another on free loopback ports, then the router; prints the router's URL and a
first request; reports and restarts a replica that dies; Ctrl-C (or SIGTERM, or a closed terminal) stops the
router and every replica. Unknown flags pass through to every replica. The cluster itself is
`streaming_tutorial.processes.cluster.LocalCluster`, which notebook 07 and the tests use.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Sequence

from streaming_tutorial.processes.cluster import LocalCluster


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster.py",
        description="Start N streaming_server.py replicas behind vLLM's router on this machine; Ctrl-C stops "
                    "everything. Unknown flags pass through to every replica (vLLM's flags).")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--policy", default="round_robin",
                        help="the router's policy: round_robin, cache_aware, consistent_hash, power_of_two, random")
    parser.add_argument("--router-arg", action="append", default=[], metavar="FLAG",
                        help="a flag for the router, e.g. --router-arg=--log-level=debug (repeatable)")
    parser.add_argument("--api-key", default=None,
                        help="the replicas' key; clients send it to the router, which forwards it")
    known, vllm_args = parser.parse_known_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a closed terminal or `kill`: stop everything, as Ctrl-C does
        signal.signal(sig, signal.default_int_handler)
    cluster = LocalCluster(known.replicas, vllm_args, policy=known.policy, api_key=known.api_key,
                           router_args=known.router_arg)
    print(f"starting {known.replicas} replicas one after another (about 30-60 s each on a 2-core CPU), "
          f"then the router; logs: {cluster.log_dir}/{cluster.name}-*.log", flush=True)
    try:
        cluster.start()
        auth = " -H 'Authorization: Bearer <key>'" if known.api_key else ""
        print(f"\nreplicas: {' '.join(cluster.replica_urls)}\n"
              f"router ({known.policy}): {cluster.url}   metrics: {cluster.metrics_url}\n"
              f"  curl -N {cluster.url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d "
              f"'{{\"model\": \"SmolLM2-135M-Instruct\", \"messages\": [{{\"role\": \"user\", \"content\": "
              f"\"Hello\"}}], \"stream\": true}}'\n"
              f"A replica that dies is reported here and started again. Ctrl-C stops the router and every "
              f"replica.", flush=True)
        while cluster.router.poll() is None:
            time.sleep(1)
        print(f"the router exited with code {cluster.router.returncode}; see {cluster.router_log}")
    except KeyboardInterrupt:
        pass
    finally:
        print(f"stopping: {cluster.stop()}", flush=True)


if __name__ == "__main__":
    main()
