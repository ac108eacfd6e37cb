"""The session token budget from memory: KV bytes per token from the model's config, free bytes per device."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from coolfusion.worker.errors import StartupError
from coolfusion.worker.hf.placement import format_bytes

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

# kv.py's SessionKV grows a buffer by half its size when it fills and keeps it after a rollback,
# so a session can hold 1.5 times the memory its cached tokens need.
BUFFER_GROWTH = 1.5
# A pass holds at most this many float32 copies of its logits at once: the model's output, its
# float32 copy and, while scoring, the log-softmax of it.
LOGIT_COPIES = 3
# Below this the worker could not hold even one long prompt with its answer; failing at start
# says so at once, instead of refusing requests later.
MIN_TOKEN_BUDGET = 2048
_CGROUP = Path("/sys/fs/cgroup")


class InsufficientMemoryError(StartupError):
    """The free memory left once the model is loaded holds too few tokens; the message names the numbers."""


@dataclass(frozen=True)
class KVCost:
    """What a cached token costs in the KV cache, layer by layer."""

    layer_bytes: tuple[int, ...]  # per layer: one token's keys and values, bytes
    windows: tuple[int | None, ...]  # per layer: its sliding window in tokens; None for full attention

    @property
    def per_token(self) -> int:
        """Bytes per cached token in this worker's layout, where every layer keeps every position
        (sliding-window layers too, for exact rollback: docs/design.md section 4.6)."""
        return sum(self.layer_bytes)

    @property
    def per_token_past_windows(self) -> int:
        """Bytes per token of a window-capped layout once its windows are full: full layers only."""
        return sum(size for size, window in zip(self.layer_bytes, self.windows) if window is None)

    def windowed_session_bytes(self, tokens: int) -> int:
        """Bytes a window-capped layout would need for one session of `tokens` tokens."""
        return sum(size * min(tokens, window or tokens) for size, window in zip(self.layer_bytes, self.windows))


def kv_cost(config: PretrainedConfig, dtype_bytes: int) -> KVCost:
    """Per layer: KV heads x head dim x 2 (keys and values) x dtype bytes, from a transformers config."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    layers = int(text.num_hidden_layers)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * layers
    window = getattr(text, "sliding_window", None)
    windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return KVCost((kv_heads * head_dim * 2 * dtype_bytes,) * layers, windows)


def kv_bytes_by_device(cost: KVCost, layer_devices: dict[int, str]) -> dict[str, int]:
    """Bytes per cached token on each device holding KV, from the device of each layer."""
    per_device: dict[str, int] = {}
    for layer, device in layer_devices.items():
        per_device[device] = per_device.get(device, 0) + cost.layer_bytes[layer]
    return per_device


def logits_bytes(pass_tokens: int, vocab_size: int) -> int:
    """The most a pass holds in logits at once (every token of a full pass is kept when scoring)."""
    return pass_tokens * vocab_size * 4 * LOGIT_COPIES


@dataclass(frozen=True)
class Sizing:
    """A memory-sized token budget and the figures behind it."""

    tokens: int
    device: str  # the device whose memory limits the budget
    free_bytes: int
    headroom: float
    reserved_bytes: int  # kept for a pass's logits
    kv_bytes_per_token: int  # on `device`

    def explain(self) -> str:
        return (
            f"{self.tokens:,} tokens: {self.device} has {format_bytes(self.free_bytes)} free; keeping "
            f"{self.headroom:.0%} of it and {format_bytes(self.reserved_bytes)} for a pass's logits, the rest holds "
            f"{self.kv_bytes_per_token:,} B of KV per token there x {BUFFER_GROWTH} for buffer growth"
        )


def size_budget(kv_bytes: dict[str, int], free: dict[str, int], headroom: float, reserved: dict[str, int]) -> Sizing:
    """The tokens every KV device can hold, keeping `headroom` (a fraction) of its free memory and
    `reserved` bytes unused; the device that holds the fewest sets the budget."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    per_device = (_on_device(d, per_token, free[d], headroom, reserved.get(d, 0)) for d, per_token in kv_bytes.items())
    sizing = min(per_device, key=lambda option: option.tokens)
    if sizing.tokens < MIN_TOKEN_BUDGET:
        raise InsufficientMemoryError(
            f"too little memory for sessions: {sizing.explain()}, fewer than {MIN_TOKEN_BUDGET:,}. Free memory "
            "(a smaller --max-memory share for weights, a smaller dtype, another device) or set --token-budget"
        )
    return sizing


def _on_device(device: str, per_token: int, free: int, headroom: float, reserved: int) -> Sizing:
    usable = free * (1 - headroom) - reserved
    return Sizing(max(0, math.floor(usable / (per_token * BUFFER_GROWTH))), device, free, headroom, reserved, per_token)


# --- free memory --------------------------------------------------------------------------------


def free_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on `device`."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Memory torch has reserved but not handed out is reusable by this process.
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    if device.type == "cpu":
        return cpu_free_bytes()
    raise StartupError(f"cannot tell the free memory of {device}; set --token-budget")


def cpu_free_bytes() -> int:
    """MemAvailable, capped by the room left under the process's cgroup memory limit (a pod's
    limit: a container sees the whole node's MemAvailable)."""
    available = mem_available(_read(Path("/proc/meminfo")) or "")
    room = cgroup_room(_CGROUP)
    return available if room is None else min(available, room)


def mem_available(meminfo: str) -> int:
    """MemAvailable from /proc/meminfo's text, in bytes."""
    for line in meminfo.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # the file counts kB
    raise StartupError("cannot tell the free CPU memory: /proc/meminfo has no MemAvailable; set --token-budget")


def cgroup_room(root: Path) -> int | None:
    """Bytes left under a cgroup v2 (or v1) memory limit, counting usage as the kubelet does
    (without inactive page cache, which the kernel reclaims first); None without a limit."""
    for limit_file, usage_file, inactive_key in (
        ("memory.max", "memory.current", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "total_inactive_file"),
    ):
        limit, usage = _read(root / limit_file), _read(root / usage_file)
        if limit is None or usage is None:
            continue
        if not limit.strip().isdigit() or int(limit) >= 2**60:  # "max", or v1's "unlimited" sentinel
            return None
        stat = _read(root / Path(limit_file).parent / "memory.stat") or ""
        inactive = next(
            (int(v) for k, _, v in (line.partition(" ") for line in stat.splitlines()) if k == inactive_key), 0
        )
        return max(0, int(limit) - (int(usage) - inactive))
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
