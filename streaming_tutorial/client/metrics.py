"""Read vLLM's Prometheus `/metrics` text with `prometheus_client`'s own parser (vLLM installs it).

    text = httpx.get(url + "/metrics").text
    metric(text, "vllm:num_requests_running")                           # 0.0 when absent
    metric(text, "vllm:request_success_total", finished_reason="stop")  # sum over matching label sets
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset], float]


def samples(text: str) -> Samples:
    """Every sample of Prometheus text as {(name, frozenset of (label, value)): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(text_or_samples: str | Samples, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0.0 when none matches).

    Counters are matched by their sample name, e.g. "vllm:request_success_total"."""
    found = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    wanted = set(labels.items())
    return sum(value for (n, ls), value in found.items() if n == name and wanted <= ls)
