"""Constraints in the protocol's terms (worker.proto's Constraint and ConstraintKind), both ways."""

from __future__ import annotations

from typing import cast

from coolfusion.constraints.grammar import Constraint, ConstraintKind
from coolfusion.v1 import worker_pb2

_PREFIX = "CONSTRAINT_KIND_"


def kind_number(kind: ConstraintKind) -> worker_pb2.ConstraintKind:
    """The protocol's number of a kind (CONSTRAINT_KIND_<KIND>)."""
    return cast(worker_pb2.ConstraintKind, worker_pb2.ConstraintKind.Value(_PREFIX + kind.name))


def constraint_proto(constraint: Constraint | None) -> worker_pb2.Constraint | None:
    if constraint is None:
        return None
    return worker_pb2.Constraint(kind=kind_number(constraint.kind), definition=constraint.definition)


def constraint_of(proto: worker_pb2.Constraint) -> Constraint | None:
    """The constraint a message carries; None for CONSTRAINT_KIND_UNSPECIFIED (free text); ValueError
    for a kind this version does not know."""
    if proto.kind == worker_pb2.CONSTRAINT_KIND_UNSPECIFIED:
        return None
    try:
        name = worker_pb2.ConstraintKind.Name(proto.kind).removeprefix(_PREFIX)
    except ValueError:
        raise ValueError(f"constraint.kind {proto.kind} is not a known kind") from None
    return Constraint(ConstraintKind[name], proto.definition)
