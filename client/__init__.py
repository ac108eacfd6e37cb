"""Client library and the `coolfusion` command line."""

from coolfusion.client.client import (
    AsyncFusionClient,
    CoolfusionError,
    DeadlineExceededError,
    FusionClient,
    InvalidArgumentError,
    NotFoundError,
    PromptLike,
    ResourceExhaustedError,
    UnavailableError,
    chat,
    error_from_rpc,
    fusion_parameters,
    fusion_strategy,
)

__all__ = [
    "AsyncFusionClient",
    "CoolfusionError",
    "DeadlineExceededError",
    "FusionClient",
    "InvalidArgumentError",
    "NotFoundError",
    "PromptLike",
    "ResourceExhaustedError",
    "UnavailableError",
    "chat",
    "error_from_rpc",
    "fusion_parameters",
    "fusion_strategy",
]
