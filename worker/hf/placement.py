"""Placing a model across devices with accelerate: the flags, the device map and where layers compute."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from coolfusion.worker.backend import DeviceShare
from coolfusion.worker.errors import StartupError

if TYPE_CHECKING:  # torch is heavy; flag parsing must not import it.
    import torch
    from transformers import PreTrainedModel

STRATEGIES = ("auto", "balanced", "sequential")
_UNITS = {"GiB": 2**30, "GB": 10**9, "MiB": 2**20, "MB": 10**6}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)(GiB|GB|MiB|MB)")
_LIMITED_DEVICE = re.compile(r"cpu|mps|cuda:\d+")  # what --max-memory may cap
_MAPPED_DEVICE = re.compile(r"cpu|mps|disk|cuda:\d+")  # what a device-map file may name

DeviceMap = dict[str, int | str]


class PlacementError(StartupError, ValueError):
    """A placement flag or file is invalid, or names a device this machine lacks."""


class ModelDoesNotFitError(PlacementError):
    """The devices and limits given cannot hold the model's weights; the message names the numbers."""


def parse_max_memory(text: str) -> tuple[tuple[str, int], ...]:
    """`cuda:0=70GiB,cpu=64GiB` -> ((device, bytes), ...); every error names the item at fault."""
    limits: dict[str, int] = {}
    for item in text.split(","):
        device, sep, size = (part.strip() for part in item.partition("="))
        if not sep:
            raise PlacementError(f"--max-memory item {item.strip()!r} is not DEVICE=SIZE (for example cuda:0=70GiB)")
        if device == "disk":
            raise PlacementError("--max-memory item 'disk=...': disk space is not capped; name cpu, mps or cuda:N")
        if not _LIMITED_DEVICE.fullmatch(device):
            raise PlacementError(f"--max-memory item {item.strip()!r}: the device must be cpu, mps or cuda:N")
        if device in limits:
            raise PlacementError(f"--max-memory names {device} twice")
        limits[device] = _parse_size(size, item.strip())
    return tuple(limits.items())


def _parse_size(size: str, item: str) -> int:
    match = _SIZE.fullmatch(size)
    if match is None:
        units = ", ".join(_UNITS)
        raise PlacementError(f"--max-memory item {item!r}: the size must be a number with a unit ({units}), e.g. 70GiB")
    amount = int(float(match[1]) * _UNITS[match[2]])
    if amount <= 0:
        raise PlacementError(f"--max-memory item {item!r}: the size must be above zero")
    return amount


def check_device_map_flag(value: str) -> str:
    """A strategy name, or a readable JSON device-map file (read and checked here, before loading)."""
    if value not in STRATEGIES:
        read_device_map_file(Path(value))
    return value


def read_device_map_file(path: Path) -> DeviceMap:
    """A JSON object mapping module names to cpu, mps, disk, cuda:N or a CUDA index N."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        strategies = ", ".join(STRATEGIES)
        raise PlacementError(f"--device-map {path}: neither {strategies} nor a readable JSON file ({error})") from None
    if not isinstance(raw, dict) or not raw:
        raise PlacementError(f"--device-map {path}: expected a JSON object mapping module names to devices")
    return {str(module): _mapped_device(path, str(module), device) for module, device in raw.items()}


def _mapped_device(path: Path, module: str, device: object) -> int | str:
    # accelerate names CUDA devices by index; bool is an int subclass and never a device.
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str) and _MAPPED_DEVICE.fullmatch(device):
        return int(device[5:]) if device.startswith("cuda:") else device
    raise PlacementError(f"--device-map {path}: module {module!r} has device {device!r}; use cpu, mps, disk or cuda:N")


def format_bytes(amount: float) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point: "1.07 GiB", "489.31 KiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(amount) >= scale:
            return f"{amount / scale:.2f} {unit}"
    return f"{amount:.0f} B"


def device_name(device: int | str | torch.device) -> str:
    """accelerate's device names as people write them: 0 -> "cuda:0"."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# --- planning, before any weight is read ------------------------------------------------------


def plan_device_map(folder: Path, device_map: str, max_memory: tuple[tuple[str, int], ...], dtype: str) -> DeviceMap:
    """The device map to load `folder` with: a strategy computed by accelerate on an empty copy of
    the model, or a file checked against it. A strategy never offloads to disk: weights that do not
    fit the devices' limits fail here, naming the numbers, instead of slowing every pass down."""
    empty = _empty_model(folder, dtype)
    if device_map not in STRATEGIES:
        planned = read_device_map_file(Path(device_map))
        _check_covers(empty, planned, device_map)
        _check_devices_exist(device for device in planned.values() if device != "disk")
        return planned
    _check_devices_exist(device for device, _ in max_memory)
    limits = _accelerate_limits(max_memory)
    planned = _infer(empty, device_map, limits)
    if "disk" in planned.values():
        raise ModelDoesNotFitError(_does_not_fit(empty, dtype, limits, bool(max_memory)))
    return planned


def _empty_model(folder: Path, dtype: str) -> PreTrainedModel:
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.tie_weights()  # a tied output layer shares the embeddings' memory: count and place it once
    return model


def _accelerate_limits(max_memory: tuple[tuple[str, int], ...]) -> dict[int | str, int] | None:
    """--max-memory in accelerate's terms (CUDA devices by index); None: every device's free memory."""
    if not max_memory:
        return None
    return {int(device[5:]) if device.startswith("cuda:") else device: amount for device, amount in max_memory}


def _infer(empty: PreTrainedModel, strategy: str, limits: dict[int | str, int] | None) -> DeviceMap:
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = list(getattr(empty, "_no_split_modules", None) or [])
    if strategy == "sequential":
        budget = get_max_memory(dict(limits) if limits else None)
    else:
        budget = get_balanced_memory(
            empty, max_memory=dict(limits) if limits else None, no_split_module_classes=no_split
        )
    return dict(infer_auto_device_map(empty, max_memory=budget, no_split_module_classes=no_split))


def _does_not_fit(empty: PreTrainedModel, dtype: str, limits: dict[int | str, int] | None, given: bool) -> str:
    from accelerate.utils import compute_module_sizes, get_max_memory

    sizes = compute_module_sizes(empty)
    available = limits if limits is not None else get_max_memory()
    listed = ", ".join(f"{device_name(device)}={format_bytes(amount)}" for device, amount in available.items())
    source = "--max-memory allows" if given else "the devices have free"
    return (
        f"the model's weights take {format_bytes(sizes[''])} in {dtype} (largest module "
        f"{format_bytes(_largest_leaf(sizes))}), more than {source}: {listed} "
        f"(total {format_bytes(sum(available.values()))}; accelerate also keeps room for the largest layer on the "
        "first device). Raise --max-memory, add devices, use a smaller dtype, or offload to disk with a --device-map file"
    )


def _largest_leaf(sizes: dict[str, int]) -> int:
    names = set(sizes)
    leaves = [size for name, size in sizes.items() if name and not any(n.startswith(name + ".") for n in names)]
    return max(leaves, default=0)


def _check_covers(empty: PreTrainedModel, planned: DeviceMap, source: str) -> None:
    modules = {name for name, _ in empty.named_modules()}
    unknown = sorted(name for name in planned if name and name not in modules)
    if unknown:
        raise PlacementError(f"--device-map {source}: no module named {', '.join(unknown)} in this model")
    missing = [name for name in empty.state_dict() if _owner(planned, name) is None]
    if missing:
        raise PlacementError(
            f"--device-map {source}: no device for {', '.join(missing[:8])}" + (" ..." * (len(missing) > 8))
        )


def _check_devices_exist(devices: Iterable[int | str]) -> None:
    import torch

    for device in set(devices):
        name = device_name(device)
        if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
            raise PlacementError(f"{name} is named, but this machine has {torch.cuda.device_count()} CUDA devices")
        if name == "mps" and not torch.backends.mps.is_available():
            raise PlacementError("mps is named, but this machine has no MPS device")


def _owner(device_map: DeviceMap, name: str) -> str | None:
    """The device-map key that places `name`: the longest one that is it or one of its parents."""
    keys = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return max(keys, key=len) if keys else None


# --- the loaded model -------------------------------------------------------------------------


def parameter_placement(model: PreTrainedModel) -> tuple[DeviceShare, ...]:
    """Where the parameters are stored (cuda:N, cpu, disk), with each device's share of them."""
    device_map: DeviceMap | None = getattr(model, "hf_device_map", None)
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():  # tied weights are listed once
        owner = _owner(device_map, name) if device_map else None
        device = device_name(device_map[owner]) if device_map and owner is not None else str(parameter.device)
        counts[device] = counts.get(device, 0) + parameter.numel()
    total = sum(counts.values()) or 1
    return tuple(DeviceShare(device, count / total) for device, count in counts.items())


def execution_device(model: PreTrainedModel, module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: under accelerate's hooks, the nearest hook's execution
    device (weights offloaded to cpu or disk compute on the main device); else its weights' device."""
    return _execution_devices(model, [module])[0]


def _execution_devices(model: PreTrainedModel, wanted: list[torch.nn.Module]) -> list[torch.device]:
    import torch

    modules = dict(model.named_modules())
    names = {id(m): name for name, m in modules.items()}
    found = []
    for module in wanted:
        path: str | None = names[id(module)]
        device = None
        while device is None and path is not None:
            device = _hook_device(getattr(modules[path], "_hf_hook", None))
            path = path.rpartition(".")[0] if path else None
        if device is None:
            device = next((p.device for p in module.parameters() if p.device.type != "meta"), "cpu")
        found.append(torch.device(device_name(device)))
    return found


def _hook_device(hook: object) -> int | str | torch.device | None:
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return device
    return None


def kv_devices(model: PreTrainedModel) -> dict[int, torch.device]:
    """Per attention layer (by layer index), the device its keys and values are computed on, which
    is where its sessions' KV buffers live (docs/design.md section 4.6)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    return {_layer_index(m): device for m, device in zip(layers, _execution_devices(model, layers))}


def _layer_index(module: torch.nn.Module) -> int:
    index: int = module.layer_idx  # type: ignore[assignment]  # set by transformers on attention modules
    return index


def keep_kwarg_off_device(model: PreTrainedModel, kwarg: str) -> bool:
    """Stops accelerate's top-level hook from moving `kwarg` to the main device; True if it had one.

    The logits index is applied to the last layer's output, which on a split model lives on the
    last device, not the main one; a CPU index works whatever device that is.
    """
    hook = getattr(model, "_hf_hook", None)
    if hook is None:
        return False
    for inner in getattr(hook, "hooks", (hook,)):
        if hasattr(inner, "skip_keys"):
            keys = inner.skip_keys
            keys = [keys] if isinstance(keys, str) else list(keys or [])
            inner.skip_keys = [*keys, kwarg]
    return True
