"""Load a resolved model folder into transformers, on one device or placed across several."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from coolfusion.worker.model_files import default_cache_dir

if TYPE_CHECKING:  # transformers/torch are heavy; import them only where needed.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


def load_model(
    folder: Path,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    max_memory: tuple[tuple[str, int], ...] = (),
    offload_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model + tokenizer from a local folder, in eval mode, never touching the network.

    Without `device_map` the whole model goes to `device`. With one (a strategy or a JSON file,
    see placement.py), accelerate places it across devices within `max_memory`, disk-offloaded
    weights going to `offload_dir`; a model that does not fit fails before any weight is read.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coolfusion.worker.hf import placement

    folder = Path(folder)
    start = time.monotonic()
    options: dict = {"dtype": getattr(torch, dtype), "local_files_only": True}
    if device_map is not None:  # planned first: a model that does not fit fails before anything loads
        planned = placement.plan_device_map(folder, device_map, max_memory, dtype)
        options["device_map"] = planned
        if "disk" in planned.values():
            options["offload_folder"] = str(_offload_folder(offload_dir, folder))
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, **options)
    if device_map is None:
        model.to(device)  # type: ignore[arg-type]  # transformers wraps .to in a decorator mypy misreads
    model.eval()
    where = ", ".join(f"{s.device} {s.parameter_share:.0%}" for s in placement.parameter_placement(model))
    logger.info("loaded %s (%s, %s) in %.1fs", folder, where, dtype, time.monotonic() - start)
    return model, tokenizer


def _offload_folder(offload_dir: Path | None, folder: Path) -> Path:
    """Where disk-offloaded weights go: per model, since weights that need converting are saved there."""
    root = offload_dir if offload_dir is not None else default_cache_dir() / "offload"
    target = root / folder.name
    target.mkdir(parents=True, exist_ok=True)
    return target
