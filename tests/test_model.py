"""Model preparation: verification catches incomplete or damaged folders; preparation is idempotent."""

from __future__ import annotations

import json
import os

import pytest

from streaming_tutorial import model


def fake_convert(gguf_path, out_dir):
    out_dir.mkdir(parents=True)
    for name in model.REQUIRED_FILES:
        (out_dir / name).write_text(f"{name} from {gguf_path.name}")


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """prepare() with the 30-second dequantization replaced by a writer of small files."""
    gguf = tmp_path / model.GGUF_FILE
    gguf.write_text("gguf")
    monkeypatch.setattr(model, "find_gguf_file", lambda: gguf)
    monkeypatch.setattr(model, "_convert", fake_convert)
    return tmp_path / "models" / "tiny"


def test_verify_names_what_is_wrong(fake_conversion):
    folder = fake_conversion
    assert verify_reason(folder) == "not prepared yet"
    fake_convert(folder.parent / "x.gguf", folder)
    assert "no manifest" in verify_reason(folder)
    model.write_manifest(folder)
    assert model.verify(folder) is None
    (folder / "config.json").write_text("truncated")
    assert "config.json" in verify_reason(folder)


def verify_reason(folder):
    reason = model.verify(folder)
    assert reason is not None
    return reason


def test_same_size_corruption_is_caught_by_the_digest(fake_conversion):
    model.prepare(fake_conversion)
    weights = fake_conversion / "model.safetensors"
    weights.write_text(weights.read_text().upper())
    assert "SHA-256" in verify_reason(fake_conversion)


def test_manifest_must_list_every_required_file(fake_conversion):
    model.prepare(fake_conversion)
    manifest = json.loads((fake_conversion / model.MANIFEST).read_text())
    del manifest["files"]["tokenizer.json"]
    (fake_conversion / model.MANIFEST).write_text(json.dumps(manifest))
    assert "tokenizer.json" in verify_reason(fake_conversion)


def test_prepare_rebuilds_an_interrupted_folder_and_removes_leftovers(fake_conversion):
    folder = fake_conversion
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("half-written")  # no manifest: an interrupted run
    leftover = folder.parent / f".{folder.name}.partial-123"
    leftover.mkdir()
    model.prepare(folder)
    assert model.verify(folder) is None
    assert not leftover.exists()
    assert "from" in (folder / "config.json").read_text()


def test_prepare_leaves_nothing_behind_when_conversion_fails(fake_conversion, monkeypatch):
    def failing_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "_convert", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        model.prepare(fake_conversion)
    assert not list(fake_conversion.parent.iterdir())


def test_prepare_on_the_real_model_is_a_verified_no_op():
    """`make test` prepares the real model first; a second prepare() must not rewrite anything."""
    assert model.verify(model.DEFAULT_MODEL_DIR) is None
    before = {p.name: os.stat(p).st_mtime_ns for p in model.DEFAULT_MODEL_DIR.iterdir()}
    model.prepare()
    after = {p.name: os.stat(p).st_mtime_ns for p in model.DEFAULT_MODEL_DIR.iterdir()}
    assert after == before
    config = json.loads((model.DEFAULT_MODEL_DIR / "config.json").read_text())
    assert "quantization_config" not in config, "the GGUF quantization flag must not reach vLLM"
    assert (model.DEFAULT_MODEL_DIR / "chat_template.jinja").read_text().strip()
    generation = json.loads((model.DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    assert generation.items() >= model.GENERATION_DEFAULTS.items(), "vLLM reads its sampling defaults here"


def test_a_folder_of_an_older_format_is_rebuilt(fake_conversion):
    model.prepare(fake_conversion)
    manifest = json.loads((fake_conversion / model.MANIFEST).read_text())
    manifest.pop("format")
    (fake_conversion / model.MANIFEST).write_text(json.dumps(manifest))
    assert "older version" in model.verify(fake_conversion)
    model.prepare(fake_conversion)
    assert model.verify(fake_conversion) is None


def test_missing_gguf_package_is_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model.ModelPreparationError, match="make setup"):
        model.find_gguf_file()
