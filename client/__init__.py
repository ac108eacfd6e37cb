"""The Python client library of OrchestratorService; the `coolfusion` command line lives in coolfusion.cli."""

from coolfusion.client.client import (
    AGGREGATIONS,
    REPETITION_GUARDS,
    SELECTIONS,
    AsyncFusionClient,
    CoolfusionError,
    DeadlineExceededError,
    FuseOptions,
    FusionClient,
    InvalidArgumentError,
    NotFoundError,
    OptionKeywords,
    PromptLike,
    ResourceExhaustedError,
    UnavailableError,
    chat,
    error_from_rpc,
    fusion_parameters,
    fusion_strategy,
)
from coolfusion.client.structured import json_object, json_schema, lark_grammar, regex
from coolfusion.client.version import PACKAGE_VERSION

__version__ = PACKAGE_VERSION

__all__ = [
    "AGGREGATIONS",
    "REPETITION_GUARDS",
    "SELECTIONS",
    "AsyncFusionClient",
    "CoolfusionError",
    "DeadlineExceededError",
    "FuseOptions",
    "FusionClient",
    "InvalidArgumentError",
    "NotFoundError",
    "OptionKeywords",
    "PromptLike",
    "ResourceExhaustedError",
    "UnavailableError",
    "__version__",
    "chat",
    "error_from_rpc",
    "fusion_parameters",
    "fusion_strategy",
    "json_object",
    "json_schema",
    "lark_grammar",
    "regex",
]
