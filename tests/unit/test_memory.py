"""The session token budget sized from memory: KV bytes per token by hand for every test and default
model, the budget a given free memory holds, free memory under cgroup limits, and the worker's use of it."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig

from coolfusion.v1 import worker_pb2, worker_pb2_grpc
from coolfusion.worker import model_files
from coolfusion.worker.errors import StartupError
from coolfusion.worker.hf import memory
from coolfusion.worker.server import _token_budget
from coolfusion.worker.settings import FALLBACK_TOKEN_BUDGET, SessionLimits

from in_process import address, sample, scrape, start_tiny_worker, tiny_backend

GIB = 2**30
FREE = 8 * GIB
PASS_TOKENS = 256  # BatchLimits().max_tokens


def expected_budget(per_token: int, vocab: int, free: int = FREE, headroom: float = 0.2) -> int:
    """The rule of docs/design.md section 4.3, written out: keep the headroom and a pass's logits
    (three float32 copies), and count each token 1.5 times for buffer growth."""
    return math.floor((free * (1 - headroom) - PASS_TOKENS * vocab * 4 * 3) / (per_token * 1.5))


# --------------------------------------------------------------------------- bytes per token


# (family, layers, KV heads, head dim): LlamaConfig, Gemma3TextConfig and GPT2Config as built by
# tests/tiny_models.py (hidden 64, 4 heads of 16; 2 KV heads where grouped; GPT-2 has no grouping).
TINY = [("bpe", 2, 2, 16), ("metaspace", 2, 2, 16), ("char", 2, 4, 16)]


@pytest.mark.parametrize(("family", "layers", "kv_heads", "head_dim"), TINY)
def test_kv_bytes_per_token_of_the_tiny_models(tiny_model_dirs, family, layers, kv_heads, head_dim):
    config = AutoConfig.from_pretrained(tiny_model_dirs[family])
    cost = memory.kv_cost(config, 4)
    assert (
        cost.per_token == layers * kv_heads * head_dim * 2 * 4 == {"bpe": 512, "metaspace": 512, "char": 1024}[family]
    )
    assert memory.kv_cost(config, 2).per_token == cost.per_token // 2  # bfloat16


def test_tiny_gemma_sliding_layer_counts_in_full_here_but_not_in_a_window_capped_layout(tiny_model_dirs):
    cost = memory.kv_cost(AutoConfig.from_pretrained(tiny_model_dirs["metaspace"]), 4)
    assert cost.windows == (32, None)
    assert cost.per_token == 512 and cost.per_token_past_windows == 256
    assert cost.windowed_session_bytes(100) == 256 * 100 + 256 * 32
    assert cost.windowed_session_bytes(10) == 512 * 10  # within the window both layouts hold everything


def default_config(preset: str) -> tuple[dict, memory.KVCost]:
    """The converted preset's config.json (no weights are loaded) and its float32 KV cost."""
    try:
        folder = model_files.resolve_model_folder(preset=preset)
    except model_files.ModelNotInstalledError as error:
        pytest.skip(str(error))
    return json.loads((folder / "config.json").read_text()), memory.kv_cost(AutoConfig.from_pretrained(folder), 4)


def test_kv_bytes_per_token_of_smollm2():
    config, cost = default_config("smollm2-135m-instruct")
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (30, 3, 64)
    assert cost.per_token == 30 * 3 * 64 * 2 * 4 == 46_080  # float32; 23,040 in bfloat16
    assert cost.per_token_past_windows == cost.per_token  # no sliding windows
    budget = memory.size_budget({"cpu": cost.per_token}, {"cpu": FREE}, 0.2, {"cpu": memory.logits_bytes(256, 49_152)})
    assert budget.tokens == expected_budget(46_080, config["vocab_size"]) == 97_236


def test_kv_bytes_per_token_of_gemma3():
    config, cost = default_config("gemma3-270m")
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]) == (18, 1, 256)
    assert config["layer_types"].count("full_attention") == 3 and config["sliding_window"] == 512
    # Every layer keeps every position in this worker's layout (docs/design.md section 4.6) ...
    assert cost.per_token == 18 * 1 * 256 * 2 * 4 == 36_864
    # ... where a window-capped layout would pay for the 3 full layers only, past 512 tokens.
    assert cost.per_token_past_windows == 3 * 1 * 256 * 2 * 4 == 6_144
    assert cost.windowed_session_bytes(4096) == 3 * 2048 * 4096 + 15 * 2048 * 512
    budget = memory.size_budget({"cpu": cost.per_token}, {"cpu": FREE}, 0.2, {"cpu": memory.logits_bytes(256, 262_144)})
    assert budget.tokens == expected_budget(36_864, config["vocab_size"]) == 109_712


# --------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(("family", "layers", "kv_heads", "head_dim"), TINY)
def test_backend_sizes_the_budget_from_the_free_memory_of_its_kv_device(
    tiny_model_dirs, monkeypatch, family, layers, kv_heads, head_dim
):
    asked = []
    monkeypatch.setattr(memory, "free_bytes", lambda device: asked.append(str(device)) or FREE)
    backend = tiny_backend(tiny_model_dirs[family], family)
    try:
        vocab = AutoConfig.from_pretrained(tiny_model_dirs[family]).vocab_size
        assert backend.token_budget(0.2) == expected_budget(layers * kv_heads * head_dim * 2 * 4, vocab)
        assert backend.token_budget(0.5) == expected_budget(layers * kv_heads * head_dim * 2 * 4, vocab, headroom=0.5)
        assert set(asked) == {"cpu"}
    finally:
        backend.shutdown()


def test_the_device_holding_the_fewest_tokens_sets_the_budget():
    sizing = memory.size_budget(
        {"cuda:0": 1000, "cuda:1": 3000}, {"cuda:0": 10 * GIB, "cuda:1": 20 * GIB}, 0.2, {"cuda:0": GIB}
    )
    assert sizing.device == "cuda:1"
    assert sizing.tokens == math.floor(20 * GIB * 0.8 / (3000 * 1.5))
    assert "cuda:1 has 20.00 GiB free" in sizing.explain()


def test_too_little_memory_fails_and_names_the_numbers():
    with pytest.raises(memory.InsufficientMemoryError) as error:
        memory.size_budget({"cpu": 36_864}, {"cpu": 500 * 2**20}, 0.2, {"cpu": 300 * 2**20})
    message = str(error.value)
    assert "cpu has 500.00 MiB free" in message and "20%" in message and "300.00 MiB for a pass's logits" in message
    assert "36,864 B of KV per token" in message and "fewer than 2,048" in message and "--token-budget" in message


def test_headroom_must_be_a_fraction():
    with pytest.raises(ValueError, match="headroom"):
        memory.size_budget({"cpu": 1}, {"cpu": GIB}, 1.0, {})


# --------------------------------------------------------------------------- free memory


MEMINFO = "MemTotal:       24683652 kB\nMemFree:        17368756 kB\nMemAvailable:   20098372 kB\n"


def test_mem_available_is_read_in_bytes():
    assert memory.mem_available(MEMINFO) == 20098372 * 1024
    with pytest.raises(StartupError, match="MemAvailable"):
        memory.mem_available("MemTotal: 1 kB\n")


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_cgroup_v2_room_counts_usage_without_inactive_page_cache(tmp_path):
    root = write(tmp_path, {"memory.max": "4294967296\n", "memory.current": "3000000000\n"})
    (root / "memory.stat").write_text("anon 2000000000\ninactive_file 500000000\nactive_file 1\n")
    assert memory.cgroup_room(root) == 4294967296 - (3000000000 - 500000000)


def test_cgroup_v1_room_and_unlimited_cgroups(tmp_path):
    v1 = write(tmp_path / "v1", {"memory/memory.limit_in_bytes": "2000\n", "memory/memory.usage_in_bytes": "1500\n"})
    (v1 / "memory/memory.stat").write_text("total_inactive_file 100\n")
    assert memory.cgroup_room(v1) == 600
    assert memory.cgroup_room(write(tmp_path / "max", {"memory.max": "max\n", "memory.current": "5\n"})) is None
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"}
    assert memory.cgroup_room(write(tmp_path / "big", unlimited)) is None
    assert memory.cgroup_room(tmp_path / "none") is None


def test_cpu_free_memory_is_capped_by_the_pod_limit(tmp_path, monkeypatch):
    read = memory._read
    monkeypatch.setattr(memory, "_read", lambda path: MEMINFO if str(path) == "/proc/meminfo" else read(path))
    monkeypatch.setattr(memory, "_CGROUP", write(tmp_path, {"memory.max": "1073741824", "memory.current": "73741824"}))
    assert memory.cpu_free_bytes() == 10**9  # the pod's room, far below the node's MemAvailable
    monkeypatch.setattr(memory, "_CGROUP", tmp_path / "absent")
    assert memory.cpu_free_bytes() == 20098372 * 1024


# --------------------------------------------------------------------------- the worker


class _FixedBackend:
    """What _token_budget reads of a backend."""

    def __init__(self, sized: int | None, max_context_tokens: int = 4096):
        self.sized = sized
        self.description = type("D", (), {"max_context_tokens": max_context_tokens})()

    def token_budget(self, headroom: float) -> int | None:
        return self.sized


def test_budget_precedence_flag_then_memory_capped_then_fallback():
    limits = SessionLimits(max_sessions=4)
    assert _token_budget(_FixedBackend(10_000), limits) == 10_000
    assert _token_budget(_FixedBackend(10**9), limits) == 4 * 4096  # no use beyond max_sessions full contexts
    assert _token_budget(_FixedBackend(None), limits) == FALLBACK_TOKEN_BUDGET
    assert _token_budget(_FixedBackend(10**9), SessionLimits(token_budget=123)) == 123


def test_worker_reports_the_budget_it_sized_or_was_given(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 64 * 2**20)
    vocab = AutoConfig.from_pretrained(tiny_model_dirs["bpe"]).vocab_size

    async def scenario(limits: SessionLimits) -> tuple[int, float | None]:
        worker = await start_tiny_worker(tiny_model_dirs["bpe"], "bpe", limits=limits)
        try:
            async with grpc.aio.insecure_channel(address(worker)) as channel:
                info = await worker_pb2_grpc.WorkerServiceStub(channel).GetInfo(worker_pb2.GetInfoRequest(), timeout=30)
            gauge = sample(await asyncio.to_thread(scrape, worker.metrics_port), "coolfusion_worker_token_budget")
            return info.limits.session_token_budget, gauge
        finally:
            await worker.stop(0)

    sized = expected_budget(512, vocab, free=64 * 2**20)
    assert asyncio.run(scenario(SessionLimits())) == (sized, sized)
    assert asyncio.run(scenario(SessionLimits(token_budget=5000))) == (5000, 5000)


def test_worker_with_too_little_memory_for_sessions_does_not_start(tiny_model_dirs, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**20)
    with pytest.raises(memory.InsufficientMemoryError, match="cpu has 1.00 MiB free"):
        asyncio.run(start_tiny_worker(tiny_model_dirs["char"], "char"))
