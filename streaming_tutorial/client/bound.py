"""What bounds one stream's tokens/s (notebook 08): this machine's memory bandwidth and arithmetic, measured with
torch, and the bytes of the weights the server holds, from the model's files and the server's /metrics.

    bandwidth = read_bandwidth("cpu")                      # bytes/s, best of a few sums over a 512 MiB tensor
    params = safetensors_parameters(model_dir)             # from the files' headers, nothing loaded
    bytes_per_param, how = served_bytes_per_param(metrics_text, config)
    bound = bandwidth / (params * bytes_per_param)         # tokens/s one stream cannot beat
"""

from __future__ import annotations

import json
import math
import struct
import time
from collections.abc import Callable
from pathlib import Path

from streaming_tutorial.client.metrics import samples

GB = 1e9
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8": 1, "int8": 1}


# --- the machine --------------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    """Wait for the device's queued work (a GPU runs torch calls asynchronously; a CPU does not)."""
    import torch
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def best_time(run: Callable[[], object], device: str, repeats: int) -> float:
    """The shortest of `repeats` timed calls of `run`, after one untimed call (warm-up)."""
    run()
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(device: str = "cpu", size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: a float32 tensor of `size_bytes` (far larger than any cache) summed,
    best of `repeats`. A sum reads every byte once and does almost no arithmetic, as a decode step's weights."""
    import torch
    x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    seconds = best_time(x.sum, device, repeats)
    return x.numel() * 4 / seconds


def matmul_flops(device: str = "cpu", dtype: str = "bfloat16", n: int = 1024, repeats: int = 5) -> float:
    """Arithmetic speed in FLOP/s: an n×n by n×n matrix product (2·n³ operations) in `dtype`, best of
    `repeats`. Big square products are the best case; a real step's smaller ones reach less."""
    import torch
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    return 2 * n**3 / best_time(lambda: a @ b, device, repeats)


# --- the served model ---------------------------------------------------------------------------------------

def safetensors_parameters(model_dir: str | Path) -> int:
    """Number of weights in a model folder's *.safetensors files, read from their headers (an 8-byte length,
    then JSON with each tensor's shape), without loading them. Tied embeddings are stored, and counted, once:
    a decode step reads them once, as the output layer."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def served_model_dir(models: dict, default_dir: Path, default_name: str) -> Path | None:
    """The folder of the served model on this machine: /v1/models' `root` if it is a folder here, else the
    bundled model's folder when the server serves the bundled model; None when neither (another machine's
    model: download its safetensors, or count its parameters from its model card)."""
    entry = models["data"][0]
    root = Path(entry.get("root") or "")
    if (root / "config.json").is_file():
        return root
    if default_name in (entry["id"], root.name) and (default_dir / "config.json").is_file():
        return default_dir
    return None


def cache_config(metrics_text: str) -> dict[str, str]:
    """The labels of vLLM's `vllm:cache_config_info` gauge ({} when absent)."""
    for (name, labels), _ in samples(metrics_text).items():
        if name == "vllm:cache_config_info":
            return dict(labels)
    return {}


def served_bytes_per_param(metrics_text: str, config: dict) -> tuple[int, str]:
    """Bytes per weight as the server holds them, and how we know.

    vLLM does not publish its dtype, but /metrics' `vllm:cache_config_info` gives the KV cache's size in bytes
    and in tokens; with `cache_dtype="auto"` the KV cache uses the model's dtype, and one token's K and V take
    2 × layers × KV heads × head size elements. Where the cache size is not given in bytes (a GPU server sizes
    it by `--gpu-memory-utilization`), the model's config.json says what `--dtype auto` loads."""
    labels = cache_config(metrics_text)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * config["num_hidden_layers"] * heads * head_dim
    try:
        kv_bytes, kv_tokens = int(labels["kv_cache_memory_bytes"]), int(labels["kv_cache_size_tokens"])
    except (KeyError, ValueError):
        kv_bytes = kv_tokens = 0
    if labels.get("cache_dtype") == "auto" and kv_tokens:
        size = round(kv_bytes / kv_tokens / per_token)
        if size in (1, 2, 4):
            return size, (f"/metrics: the KV cache holds {kv_tokens:,} tokens in {kv_bytes:,} bytes, {size} bytes "
                          f"per element ({per_token:,} elements a token), in the model's dtype (cache_dtype auto)")
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return DTYPE_BYTES.get(name, 2), f"config.json's dtype, {name} (what vLLM's `--dtype auto` loads on a GPU)"
