"""The worker registry: which workers exist, where, and how to reach them (file or environment)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import yaml

from coolfusion.orchestrator.replicas import ReplicaSet, fixed, resolve_dns, split_host_port
from coolfusion.orchestrator.strategy import PROMPT_SLOT, StrategyOverrides
from coolfusion.orchestrator.worker_client import WorkerClient
from coolfusion.serving.security import TokenFile

_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# A route is named as the HTTP gateway's models are: "coolfusion/extract".
_ROUTE = re.compile(r"[a-z0-9][a-z0-9/._-]{0,126}[a-z0-9]|[a-z0-9]")
# Fusion streams candidates and traces; 16 MB bounds a misbehaving worker's answers.
_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_REPLICAS_HELP = (
    "'dns' (address is host:port of a headless Service whose A/AAAA records are the pods) or "
    "'static' (address is a comma-separated list of host:port), or absent for one gRPC target"
)


class RegistryError(ValueError):
    """The registry file or environment is malformed."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards one worker; `cert_file`/`key_file` enable mutual TLS."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class WorkerEntry:
    """One registered worker.

    Without `replicas`, `address` is one gRPC target, resolved by gRPC behind one channel. With
    `replicas`, the orchestrator finds the worker's pods itself and keeps a channel to each, so that
    every call of a session reaches the pod holding its cache:
    - `replicas: dns`: `address` is `host:port` (or `dns:///host:port`) of a headless Service; its
      A/AAAA records are the pods, re-resolved every `refresh_s` seconds.
    - `replicas: static`: `address` lists the replicas, `host:port,host:port,...`.
    """

    name: str
    address: str
    tls: TlsSettings | None = None
    token_file: str | None = None
    replicas: str | None = None  # None, "dns" or "static"
    # New pods take sessions within seconds; one DNS lookup per worker every 10 s costs nothing.
    refresh_s: float = 10.0
    # Fusion defaults for this worker (orchestrator/strategy.py); requests may override them.
    weight: float = 1.0  # its score's weight in the fused score
    prompt_template: str | None = None  # containing "{prompt}": the worker gets plain text

    def token(self) -> TokenFile | None:
        """The bearer token to send (the file's first line), read again whenever the file changes."""
        return TokenFile(Path(self.token_file), f"worker {self.name}: token_file") if self.token_file else None


def parse_registry(document: dict) -> list[WorkerEntry]:
    """Entries from a parsed registry document (`{"workers": [...]}`)."""
    items = document.get("workers") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise RegistryError("the registry needs a top-level 'workers' list")
    entries = [_entry(i, item) for i, item in enumerate(items)]
    _check_unique([e.name for e in entries])
    return entries


def _check_unique(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RegistryError(f"duplicate worker names: {', '.join(duplicates)}")


def _entry(index: int, item: dict) -> WorkerEntry:
    if not isinstance(item, dict) or not item.get("name") or not item.get("address"):
        raise RegistryError(f"workers[{index}] needs a name and an address")
    name = str(item["name"])
    if not _NAME.fullmatch(name):
        raise RegistryError(f"workers[{index}].name {name!r} must be lowercase letters, digits and '-'")
    tls = item.get("tls")
    if tls is not None and not isinstance(tls, dict):
        raise RegistryError(f"workers[{index}].tls must be a mapping")
    replicas, refresh_s = item.get("replicas"), item.get("refresh_s", WorkerEntry.refresh_s)
    if replicas is not None and replicas not in ("dns", "static"):
        raise RegistryError(f"workers[{index}].replicas is {replicas!r}; it must be {_REPLICAS_HELP}")
    if isinstance(refresh_s, bool) or not isinstance(refresh_s, int | float) or refresh_s <= 0:
        raise RegistryError(f"workers[{index}].refresh_s is {refresh_s!r}; it must be a positive number of seconds")
    weight, template = item.get("weight", 1.0), item.get("prompt_template")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < math.inf:
        raise RegistryError(f"workers[{index}].weight is {weight!r}; it must be a positive number")
    if template is not None and (not isinstance(template, str) or PROMPT_SLOT not in template):
        raise RegistryError(f"workers[{index}].prompt_template must be a string containing {PROMPT_SLOT}")
    entry = WorkerEntry(
        name=name,
        address=str(item["address"]),
        tls=TlsSettings(**{k: tls.get(k) for k in ("ca_file", "cert_file", "key_file", "server_name")})
        if tls is not None
        else None,
        token_file=item.get("token_file"),
        replicas=replicas,
        refresh_s=float(refresh_s),
        weight=float(weight),
        prompt_template=template,
    )
    if replicas is not None:
        try:
            for target in _targets(entry):
                split_host_port(target)
        except ValueError as error:
            message = f"workers[{index}].address: {error}; with replicas, it must be {_REPLICAS_HELP}"
            raise RegistryError(message) from error
    return entry


def registry_strategy(entries: list[WorkerEntry]) -> StrategyOverrides:
    """The fusion defaults the entries set: weights other than 1, and prompt templates."""
    return StrategyOverrides(
        weights={e.name: e.weight for e in entries if e.weight != 1.0},
        prompt_templates={e.name: e.prompt_template for e in entries if e.prompt_template is not None},
    )


def _targets(entry: WorkerEntry) -> list[str]:
    """The addresses to dial (DNS mode: the one to resolve)."""
    if entry.replicas == "static":
        return [a.strip() for a in entry.address.split(",")]
    return [entry.address]


def load_registry(path: Path | None, env_value: str | None = None) -> list[WorkerEntry]:
    """Reads a YAML/JSON registry file, then appends `name=address,...` entries from the environment.

    `env_value` is the COOLFUSION_WORKERS variable's value, read by the caller at start-up.
    """
    entries: list[WorkerEntry] = []
    if path is not None:
        entries = parse_registry(_read_document(path))
    if env_value:
        pairs = [p.split("=", 1) for p in env_value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise RegistryError("COOLFUSION_WORKERS must look like name=host:port,name=host:port")
        entries += parse_registry({"workers": [{"name": n.strip(), "address": a.strip()} for n, a in pairs]})
    if not entries:
        raise RegistryError("no workers registered: pass --workers FILE or set COOLFUSION_WORKERS")
    _check_files_readable(entries)
    _check_unique([e.name for e in entries])
    return entries


def registry_calibrations(path: Path | None) -> list[Path]:
    """The calibration files a registry file lists (`calibrations:`), relative to its folder."""
    if path is None:
        return []
    listed = _read_document(path).get("calibrations", [])
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise RegistryError("the registry's 'calibrations' must be a list of file paths")
    return [Path(path).parent / p for p in listed]


def registry_routes(path: Path | None) -> dict[str, str]:
    """The routes a registry file lists (`routes:`, each a `name` and the `calibration` it runs),
    as route name -> calibration name, in file order."""
    if path is None:
        return {}
    listed = _read_document(path).get("routes", [])
    if not isinstance(listed, list):
        raise RegistryError("the registry's 'routes' must be a list of {name, calibration}")
    routes: dict[str, str] = {}
    for index, item in enumerate(listed):
        if not isinstance(item, dict) or set(item) != {"name", "calibration"}:
            raise RegistryError(f"routes[{index}] must have exactly a name and a calibration")
        add_route(routes, str(item["name"]), str(item["calibration"]), f"routes[{index}]")
    return routes


def add_route(routes: dict[str, str], name: str, calibration: str, where: str) -> None:
    """Adds one route, refusing a malformed or repeated name (`where` says which entry or flag)."""
    if not _ROUTE.fullmatch(name):
        raise RegistryError(f"{where}: route {name!r} must be lowercase letters, digits, '-', '.', '_' and '/'")
    if name in routes:
        raise RegistryError(f"{where}: route {name!r} is given twice")
    routes[name] = calibration


def _read_document(path: Path) -> dict:
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)


def replica_set(entry: WorkerEntry) -> ReplicaSet:
    """The entry's replicas: resolved from DNS, listed, or its one target."""
    resolve = partial(resolve_dns, entry.address) if entry.replicas == "dns" else fixed(_targets(entry))
    return ReplicaSet(entry.name, resolve, partial(_connect, entry), entry.refresh_s)


def _connect(entry: WorkerEntry, address: str) -> WorkerClient:
    return WorkerClient(entry.name, open_channel(entry, address), entry.token(), address)


def _check_files_readable(entries: list[WorkerEntry]) -> None:
    """Fails start-up on a missing TLS or token file, instead of failing the first request."""
    for entry in entries:
        tls = entry.tls or TlsSettings()
        files = {"token_file": entry.token_file, "tls.ca_file": tls.ca_file}
        files |= {"tls.cert_file": tls.cert_file, "tls.key_file": tls.key_file}
        for field, path in files.items():
            if path and not os.access(path, os.R_OK):
                raise RegistryError(f"worker {entry.name}: {field} {path} is missing or unreadable")


def open_channel(entry: WorkerEntry, target: str) -> grpc.aio.Channel:
    """A channel to one target of the worker, with TLS (and client certificate) when configured."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        # Notice dead workers within seconds even when no call is in flight.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        # gRPC shares connections, with their reconnect backoff, between channels to the same target;
        # a channel of its own lets a replica re-dialled after a failure (replicas.py) connect at once.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if entry.tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    tls = entry.tls
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file),
        certificate_chain=_read(tls.cert_file),
    )
    # A pod found in DNS is dialled by IP, but its certificate names the Service.
    server_name = tls.server_name or (split_host_port(entry.address)[0] if entry.replicas == "dns" else None)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def workers_from_environment() -> str | None:
    """The COOLFUSION_WORKERS variable (for __main__; never read at import time)."""
    return os.environ.get("COOLFUSION_WORKERS")


class WorkerPool:
    """The replicas of every registered worker (one channel per replica), shared by all requests."""

    def __init__(self, entries: list[WorkerEntry] | tuple[WorkerEntry, ...]):
        self.entries = list(entries)
        self.replicas = {e.name: replica_set(e) for e in self.entries}

    def select(self, names: list[str]) -> list[ReplicaSet]:
        """Replica sets for `names` in that order; all registered workers when `names` is empty."""
        unknown = [n for n in names if n not in self.replicas]
        if unknown:
            raise RegistryError(f"unknown workers: {', '.join(unknown)}; registered: {', '.join(self.replicas)}")
        if len(set(names)) != len(names):
            raise RegistryError("a worker is named twice")
        return [self.replicas[n] for n in (names or list(self.replicas))]

    async def close(self) -> None:
        for replicas in self.replicas.values():
            await replicas.close()
