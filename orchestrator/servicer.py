"""OrchestratorService handlers: validate the request, run the fusion, convert the result."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar

import grpc

from coolfusion.calibration.scope import TEXT as TEXT_ANSWER
from coolfusion.constraints.tools import ToolCall
from coolfusion.orchestrator.admission import Admission
from coolfusion.orchestrator.calibrations import Calibrations, RuleChoice, Traits, check_tag
from coolfusion.orchestrator.domain import ChatTurn, Prompt, Step, Usage
from coolfusion.orchestrator.explore import DEFAULT_MAX_NODES, Explorer, ExploreRequest
from coolfusion.orchestrator.fusion import FusionRequest, FusionResult, fuse
from coolfusion.orchestrator.observer import NO_OBSERVER, FusionObserver, observing
from coolfusion.orchestrator.registry import RegistryError, WorkerEntry, WorkerPool, registry_strategy
from coolfusion.orchestrator.replicas import ReplicaSet
from coolfusion.orchestrator.sampling import SamplingPlan, Selection, draw_request_seed
from coolfusion.orchestrator.sessions import Deadline, NoWorkersLeft
from coolfusion.orchestrator.settings import OrchestratorSettings, RequestLimits
from coolfusion.orchestrator.strategy import PROMPT_SLOT, Aggregation, RepetitionGuard, Strategy, StrategyOverrides
from coolfusion.orchestrator.structured import check_tool_turns, parse_structure, parse_tools
from coolfusion.orchestrator.tree_proto import FINISH_PROTO, candidate_proto, tree_proto
from coolfusion.orchestrator.worker_client import SessionLost, WorkerClient, WorkerFailed
from coolfusion.orchestrator.worker_info import WorkerInfo
from coolfusion.serving.version import SERVER_VERSION
from coolfusion.v1 import orchestrator_pb2, orchestrator_pb2_grpc, worker_pb2

T = TypeVar("T")
# A weight outside this range is a typo or an attempt to silence every other worker.
_MAX_WEIGHT = 1e6
# ListWorkers must answer quickly even when a worker hangs.
_PROBE_TIMEOUT_S = 2.0


class InvalidFusionRequest(ValueError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""


class RequestTimedOut(Exception):
    """The request's time budget ran out before it finished (DEADLINE_EXCEEDED)."""


def parse_request(
    parameters: orchestrator_pb2.FusionParameters,
    limits: RequestLimits,
    request_id: str,
    default_strategy: Strategy,
    known_workers: set[str],
) -> FusionRequest:
    """Validates a request's parameters; errors name the field and the allowed range."""
    max_new = _in_range(
        "max_new_tokens", parameters.max_new_tokens, limits.default_max_new_tokens, limits.max_new_tokens
    )
    segment = _in_range(
        "segment_max_tokens", parameters.segment_max_tokens, limits.default_segment_tokens, limits.max_segment_tokens
    )
    if len(parameters.stop_strings) > limits.max_stop_strings:
        raise InvalidFusionRequest(
            f"{len(parameters.stop_strings)} stop_strings; the limit is {limits.max_stop_strings}"
        )
    if any(not 1 <= len(s) <= limits.max_stop_chars for s in parameters.stop_strings):
        raise InvalidFusionRequest(f"each stop string must be 1-{limits.max_stop_chars} characters")
    prompt = _prompt(parameters.prompt, limits.max_prompt_chars)
    return FusionRequest(
        prompt=prompt,
        max_new_tokens=max_new,
        stop_strings=tuple(parameters.stop_strings),
        segment_max_tokens=segment,
        rerank=parameters.rerank_mode == orchestrator_pb2.RERANK_MODE_FULL_ANSWER,
        request_id=request_id,
        strategy=default_strategy.overridden_by(_strategy(parameters.strategy, limits, known_workers)),
        structure=parse_structure(parameters, prompt.tools),
        sampling=_sampling(parameters),
    )


def _sampling(parameters: orchestrator_pb2.FusionParameters) -> SamplingPlan | None:
    """The request's sampling; None (greedy) when unset or at temperature 0."""
    sampling = parameters.sampling
    if not 0 <= sampling.temperature <= 2:  # also refuses NaN
        raise InvalidFusionRequest(f"sampling.temperature is {sampling.temperature}; it must be in [0, 2]")
    if not 0 <= sampling.top_p <= 1:
        raise InvalidFusionRequest(f"sampling.top_p is {sampling.top_p}; it must be in (0, 1] (0 for 1)")
    if sampling.temperature == 0:
        return None
    seed = sampling.seed if sampling.HasField("seed") else draw_request_seed()
    selection = Selection.SAMPLE if sampling.selection == orchestrator_pb2.SELECTION_SAMPLE else Selection.BEST
    return SamplingPlan(sampling.temperature, sampling.top_p or 1.0, sampling.top_k, seed, selection)


def choices(parameters: orchestrator_pb2.FusionParameters, limits: RequestLimits) -> int:
    """How many answers the request asks for (n)."""
    return _in_range("n", parameters.n, 1, limits.max_choices)


def _strategy(
    strategy: orchestrator_pb2.FusionStrategy, limits: RequestLimits, known_workers: set[str]
) -> StrategyOverrides:
    """The request's own strategy fields; names must be registered workers."""
    if unknown := (set(strategy.worker_weights) | set(strategy.prompt_templates)) - known_workers:
        raise InvalidFusionRequest(f"strategy names unknown workers {sorted(unknown)}")
    for name, weight in strategy.worker_weights.items():
        if not 0 < weight <= _MAX_WEIGHT:  # also refuses NaN
            raise InvalidFusionRequest(f"worker_weights[{name!r}] is {weight}; it must be in (0, {_MAX_WEIGHT:g}]")
    if strategy.calibration and (strategy.aggregation or strategy.worker_weights):
        raise InvalidFusionRequest(
            f"strategy names calibration {strategy.calibration!r} together with an aggregation or worker_weights; "
            "a calibration replaces both"
        )
    for name, template in strategy.prompt_templates.items():
        if PROMPT_SLOT not in template or len(template) > limits.max_prompt_chars:
            raise InvalidFusionRequest(
                f"prompt_templates[{name!r}] must contain {PROMPT_SLOT} and be at most {limits.max_prompt_chars} characters"
            )
    return StrategyOverrides(
        aggregation=_enum_value(Aggregation, orchestrator_pb2.Aggregation, "AGGREGATION_", strategy.aggregation),
        weights=dict(strategy.worker_weights),
        repetition_guard=_enum_value(
            RepetitionGuard, orchestrator_pb2.RepetitionGuard, "REPETITION_GUARD_", strategy.repetition_guard
        ),
        prompt_templates=dict(strategy.prompt_templates),
    )


def _enum_value(python_enum, proto_enum, prefix: str, number: int):
    """The Python member named like the proto value without its prefix (AGGREGATION_NLL_MEAN ->
    NLL_MEAN); None when unset."""
    if number == 0:
        return None
    try:
        return python_enum[proto_enum.Name(number).removeprefix(prefix)]
    except ValueError:
        raise InvalidFusionRequest(f"unknown {proto_enum.DESCRIPTOR.name} value {number}") from None


def strategy_proto(strategy: Strategy) -> orchestrator_pb2.FusionStrategy:
    """What ran: the calibration by name, or the aggregation and weights it replaces."""
    calibrated = strategy.calibration is not None
    return orchestrator_pb2.FusionStrategy(
        aggregation=None if calibrated else f"AGGREGATION_{strategy.aggregation.name}",
        worker_weights={} if calibrated else dict(strategy.weights),
        repetition_guard=f"REPETITION_GUARD_{strategy.repetition_guard.name}",
        prompt_templates=dict(strategy.prompt_templates),
        calibration=strategy.calibration.name if strategy.calibration else "",
    )


def _in_range(field: str, value: int, default: int, limit: int) -> int:
    if value == 0:
        return default
    if value > limit:
        raise InvalidFusionRequest(f"{field} is {value}; it must be in [1, {limit}] (0 for the default {default})")
    return value


def _prompt(prompt: worker_pb2.Prompt, max_chars: int) -> Prompt:
    kind = prompt.WhichOneof("kind")
    if kind == "text" and prompt.text.strip():
        parsed = Prompt(text=prompt.text)
        text = prompt.text
    elif kind == "chat" and prompt.chat.messages:
        turns = tuple(_turn(m) for m in prompt.chat.messages)
        if any(t.role not in ("system", "user", "assistant", "tool") for t in turns):
            raise InvalidFusionRequest("chat roles must be system, user, assistant or tool")
        check_tool_turns(turns)
        parsed = Prompt(chat=turns, tools=parse_tools(prompt.chat))
        spelled = [t.content + "".join(c.arguments for c in t.tool_calls) for t in turns]
        text = "".join(spelled) + "".join(t.description + t.parameters for t in parsed.tools)
    else:
        raise InvalidFusionRequest("prompt must be non-empty text or at least one chat message")
    if len(text) > max_chars:
        raise InvalidFusionRequest(f"prompt is {len(text)} characters; the limit is {max_chars}")
    return parsed


def _turn(message: worker_pb2.ChatMessage) -> ChatTurn:
    calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls)
    return ChatTurn(message.role, message.content, calls, message.tool_call_id)


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Runs fusions over the registered workers; keeps no state between requests."""

    def __init__(
        self,
        pool: WorkerPool,
        settings: OrchestratorSettings,
        admission: Admission,
        observer: FusionObserver = NO_OBSERVER,
    ):
        self._pool = pool
        self._settings = settings
        self._admission = admission  # bounds the fusions running at once
        self._observer = observer  # metrics and spans of every request
        # The operator's flags, then each registry entry's weight and template; requests override.
        self._default_strategy = settings.strategy.overridden_by(registry_strategy(pool.entries))
        self._worker_names = {entry.name for entry in pool.entries}  # what a strategy may name
        self._calibrations = Calibrations(settings.calibrations, settings.default_calibration, settings.routes)
        self._info = WorkerInfo()  # what workers say of themselves, for constrained requests

    async def Fuse(
        self, request: orchestrator_pb2.FuseRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.FuseResponse:
        """Runs one fusion (n, with n > 1) to the end."""
        results, rule = await self._fuse(request.parameters, context)
        answers = [_result_proto(result, request.parameters.include_trace, rule) for result in results]
        return orchestrator_pb2.FuseResponse(result=answers[0], choices=answers if len(answers) > 1 else [])

    async def FuseStream(self, request: orchestrator_pb2.FuseStreamRequest, context: grpc.aio.ServicerContext):
        """Streams one event per chosen segment, and each answer's summary once it is finished."""
        events: asyncio.Queue[orchestrator_pb2.FuseStreamResponse | None] = asyncio.Queue()

        async def on_step(step: Step, choice: int) -> None:
            await events.put(orchestrator_pb2.FuseStreamResponse(step=_step_proto(step, choice)))

        async def on_result(result: FusionResult, rule: RuleChoice) -> None:
            await events.put(orchestrator_pb2.FuseStreamResponse(summary=_result_proto(result, False, rule)))

        task = asyncio.create_task(self._fuse(request.parameters, context, on_step, on_result))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            await task  # a failure after the last event is raised here
        finally:
            task.cancel()  # the client went away: stop the fusion, which closes its sessions

    async def ListWorkers(
        self, request: orchestrator_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ListWorkersResponse:
        """Probes every registered worker's health and description (every replica), concurrently."""
        with observing(self._observer):
            statuses = await asyncio.gather(*(self._probe(entry) for entry in self._pool.entries))
        routes = [
            orchestrator_pb2.Route(name=name, calibration=calibration, workers=self._calibrations.by_name[calibration].worker_names)
            for name, calibration in self._calibrations.routes.items()
        ]  # fmt: skip
        return orchestrator_pb2.ListWorkersResponse(
            workers=statuses, orchestrator_version=SERVER_VERSION, routes=routes
        )

    async def ExploreFusion(
        self, request: orchestrator_pb2.ExploreFusionRequest, context: grpc.aio.ServicerContext
    ) -> orchestrator_pb2.ExploreFusionResponse:
        """Maps every answer a fusion of the request's workers could give (docs/design.md section 3.7)."""
        limits = self._settings.limits
        max_nodes = _in_range("max_nodes", request.max_nodes, DEFAULT_MAX_NODES, limits.max_explore_nodes)
        if request.parameters.sampling.temperature or request.parameters.n > 1:
            raise InvalidFusionRequest(
                "ExploreFusion maps the greedy proposals of one answer: send no sampling and n 1"
            )
        settings = self._settings

        def explore(workers: list[ReplicaSet], fusion: FusionRequest, deadline: float, _: RuleChoice):
            if fusion.left_out:  # a tree needs every worker's proposals
                reasons = "; ".join(f"{d.worker} {d.reason}" for d in fusion.left_out)
                raise InvalidFusionRequest(f"cannot explore under this constraint: {reasons}")
            limits = Deadline(deadline, settings.call_timeout_s, settings.busy_wait_s)
            return Explorer(workers, ExploreRequest(fusion, max_nodes), limits).run()

        tree = await self._serve(request.parameters, context, explore)
        return orchestrator_pb2.ExploreFusionResponse(tree=tree_proto(tree))

    async def _fuse(
        self,
        parameters: orchestrator_pb2.FusionParameters,
        context: grpc.aio.ServicerContext,
        on_step: Callable[[Step, int], Awaitable[None]] | None = None,
        on_result: Callable[[FusionResult, RuleChoice], Awaitable[None]] | None = None,
    ) -> tuple[list[FusionResult], RuleChoice]:
        """The request's n answers, each fused on its own (docs/design.md section 10.3), and the rule
        they ran with; `on_step` hears every chosen segment with its answer's number, `on_result`
        every finished answer."""
        settings = self._settings
        n = choices(parameters, settings.limits)

        async def answer(
            workers: list[ReplicaSet], request: FusionRequest, deadline: float, rule: RuleChoice
        ) -> FusionResult:
            steps = None if on_step is None else partial(_with_choice, on_step, request.choice)
            result = await fuse(workers, request, deadline, settings.call_timeout_s, steps, settings.busy_wait_s)
            if on_result is not None:
                await on_result(result, rule)
            return result

        async def answers(
            workers: list[ReplicaSet], request: FusionRequest, deadline: float, rule: RuleChoice
        ) -> tuple[list[FusionResult], RuleChoice]:
            if request.sampling is None:  # greedy answers are all the same: fused once
                first = await answer(workers, request, deadline, rule)
                others = [replace(first, choice=i) for i in range(1, n)]
                for other in others:
                    if on_result is not None:
                        await on_result(other, rule)
                return [first, *others], rule
            tasks = [
                asyncio.ensure_future(answer(workers, replace(request, choice=i), deadline, rule)) for i in range(n)
            ]
            try:
                return list(await asyncio.gather(*tasks)), rule
            finally:  # one failed: the others stop too, and close their sessions
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        return await self._serve(parameters, context, answers)

    async def _serve(
        self,
        parameters: orchestrator_pb2.FusionParameters,
        context: grpc.aio.ServicerContext,
        work: Callable[[list[ReplicaSet], FusionRequest, float, RuleChoice], Awaitable[T]],
    ) -> T:
        """Validates the parameters, chooses the selection rule (calibrations.py), waits for an
        admission slot and runs `work(workers, request, deadline, rule)` within the request's time
        budget (the caller's deadline, capped by ours)."""
        request_id = uuid.uuid4().hex
        request = parse_request(
            parameters, self._settings.limits, request_id, self._default_strategy, self._worker_names
        )
        check_tag(parameters.tag)
        asked = parameters.strategy
        named, how = self._calibrations.requested(parameters.route, asked.calibration, bool(asked.aggregation))
        try:  # a calibration named without workers fuses its own
            workers = self._pool.select(list(parameters.workers) or list(named.worker_names if named else ()))
        except RegistryError as error:
            raise InvalidFusionRequest(str(error)) from error
        constraint = request.structure.constraint
        form = "plain" if request.prompt.text is not None else "chat"
        answer = TEXT_ANSWER if constraint is None else constraint.kind.value
        traits = Traits(parameters.tag, form, request.max_new_tokens, answer)
        rule = await self._calibrations.for_request(named, how, bool(asked.aggregation), workers, traits)
        request = self._calibrated(request, asked, rule)
        workers, request = await self._enforcing(workers, request)
        remaining = context.time_remaining()
        budget = (
            self._settings.request_timeout_s if remaining is None else min(remaining, self._settings.request_timeout_s)
        )
        deadline = time.monotonic() + budget
        try:
            async with self._admission.slot(wait_s=budget):
                with observing(self._observer), self._observer.fusion(request_id):
                    return await work(workers, request, deadline, rule)
        except NoWorkersLeft as error:
            if time.monotonic() >= deadline:
                # The workers did not fail: the request ran out of time (our own request timeout;
                # a caller's deadline cancels the call before this). Say so, not UNAVAILABLE.
                raise RequestTimedOut(f"the request took longer than {budget:.0f} s") from error
            raise

    async def _enforcing(
        self, workers: list[ReplicaSet], request: FusionRequest
    ) -> tuple[list[ReplicaSet], FusionRequest]:
        """Under a constraint, the workers that enforce it; the others are left out (and listed
        among the dropped), never asked for unconstrained text (docs/design.md section 9.3)."""
        constraint = request.structure.constraint
        if constraint is None:
            return workers, request
        kept, left_out = await self._info.enforcing(workers, constraint.kind)
        if not kept:
            reasons = "; ".join(f"{d.worker} {d.reason}" for d in left_out)
            raise InvalidFusionRequest(f"no worker of this request enforces {constraint.kind} constraints: {reasons}")
        return kept, replace(request, left_out=tuple(left_out))

    @staticmethod
    def _calibrated(request: FusionRequest, asked: orchestrator_pb2.FusionStrategy, rule: RuleChoice) -> FusionRequest:
        """The request with the calibration it runs with, if any (calibrations.py decides which)."""
        calibration = rule.calibration
        if calibration is None:
            return request
        guard = request.strategy.repetition_guard if asked.repetition_guard else None
        overrides = StrategyOverrides(repetition_guard=guard, calibration=calibration)
        return replace(request, strategy=request.strategy.overridden_by(overrides))

    async def _probe(self, entry: WorkerEntry) -> orchestrator_pb2.WorkerStatus:
        """Serving when any replica serves; the info is the first serving replica's."""
        status = orchestrator_pb2.WorkerStatus(name=entry.name, address=entry.address)
        replicas = self._pool.replicas[entry.name]
        pods = await replicas.pods()
        probes = await asyncio.gather(*(_probe_replica(c) for c in pods))
        serving = [answer for answer in probes if isinstance(answer, worker_pb2.GetInfoResponse)]
        status.serving = bool(serving)
        if serving:
            status.info.CopyFrom(serving[0])
        elif not pods:
            status.error = replicas.problem or "no replica"
        elif len(pods) == 1:
            status.error = str(probes[0])
        else:
            status.error = f"0 of {len(pods)} replicas serving; {pods[0].address}: {probes[0]}"
        return status


async def _probe_replica(client: WorkerClient) -> worker_pb2.GetInfoResponse | str:
    """The replica's info when it serves, else why not."""
    try:
        if not await client.is_serving(_PROBE_TIMEOUT_S):
            return "health check reports NOT_SERVING (loading or draining)"
        return await client.get_info(_PROBE_TIMEOUT_S)
    except (WorkerFailed, SessionLost) as error:
        return str(error)


async def _with_choice(on_step: Callable[[Step, int], Awaitable[None]], choice: int, step: Step) -> None:
    await on_step(step, choice)


def _step_proto(step: Step, choice: int = 0) -> orchestrator_pb2.FuseStep:
    return orchestrator_pb2.FuseStep(
        choice=choice,
        index=step.index,
        candidates=[candidate_proto(c) for c in step.candidates],
        winner_index=step.winner_index,
        winner_worker=step.winner.proposed_by[0],
        generate_ms=step.generate_ms,
        score_ms=step.score_ms,
    )


def _result_proto(result: FusionResult, include_trace: bool, rule: RuleChoice) -> orchestrator_pb2.FuseResult:
    fused = result.fused
    shares = {name: orchestrator_pb2.WorkerShare(worker=name) for name in result.workers}
    position = 0  # a stop string may have cut the last segments: count only characters kept
    for step in fused.steps:
        share = shares[step.winner.proposed_by[0]]
        share.segments += 1
        share.chars += max(0, min(len(step.winner.text), len(fused.text) - position))
        position += len(step.winner.text)
    return orchestrator_pb2.FuseResult(
        text=result.text,
        finish_reason=FINISH_PROTO[result.finish],
        shares=list(shares.values()),
        dropped=[orchestrator_pb2.DroppedWorker(worker=d.worker, reason=d.reason, step=d.step) for d in result.dropped],
        timings=orchestrator_pb2.Timings(
            total_ms=result.total_ms,
            open_ms=fused.open_ms,
            generate_ms=sum(s.generate_ms for s in fused.steps),
            score_ms=sum(s.score_ms for s in fused.steps),
            rerank_ms=result.rerank_ms,
            steps=len(fused.steps),
            worker_compute_ms=sum(s.worker_compute_ms for s in fused.steps),
        ),
        trace=[_step_proto(s, result.choice) for s in fused.steps] if include_trace else [],
        source=result.source,
        rerank=[
            orchestrator_pb2.RerankEntry(source=r.source, text=r.text, fused_score=r.fused_score)
            for r in result.ranking
        ],
        request_id=result.request_id,
        choice=result.choice,
        seed=result.seed,
        strategy=strategy_proto(result.strategy),
        usage=_usage_proto(result.usage),
        rule_choice=orchestrator_pb2.RuleChoice(reason=f"RULE_REASON_{rule.reason.name}", detail=rule.detail),
        tool_calls=[worker_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in result.tool_calls],
    )


def _usage_proto(usage: Usage | None) -> orchestrator_pb2.Usage | None:
    if usage is None:
        return None
    return orchestrator_pb2.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, worker=usage.worker
    )
