"""Step candidates and fusion trees to and from their protobuf messages: the servicer sends trees,
and whoever replays one offline (`coolfusion calibrate`) reads it back into the same domain types."""

from __future__ import annotations

from coolfusion.orchestrator.domain import (
    CandidateScore,
    Finish,
    FusionTree,
    StepCandidate,
    TreeAnswer,
    TreeBranch,
    TreeNode,
)
from coolfusion.v1 import orchestrator_pb2, worker_pb2

FINISH_PROTO = {
    Finish.EOS: worker_pb2.FINISH_REASON_EOS,
    Finish.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    Finish.STOP: worker_pb2.FINISH_REASON_STOP,
    Finish.REPETITION: worker_pb2.FINISH_REASON_REPETITION,
    Finish.TOOL_CALLS: worker_pb2.FINISH_REASON_TOOL_CALLS,
}
_FINISH_OF = {number: finish for finish, number in FINISH_PROTO.items()}


def scores_proto(scores: dict[str, CandidateScore]) -> list[orchestrator_pb2.ModelScore]:
    return [
        orchestrator_pb2.ModelScore(
            worker=name, perplexity=s.perplexity, scored_tokens=s.scored_tokens, log_prob_sum=s.log_prob_sum
        )
        for name, s in scores.items()
    ]


def candidate_proto(candidate: StepCandidate) -> orchestrator_pb2.StepCandidate:
    return orchestrator_pb2.StepCandidate(
        text=candidate.text,
        ends_with_eos=candidate.ends_with_eos,
        proposed_by=candidate.proposed_by,
        scores=scores_proto(candidate.scores),
        fused_score=candidate.fused_score,
    )


def tree_proto(tree: FusionTree) -> orchestrator_pb2.FusionTree:
    return orchestrator_pb2.FusionTree(
        workers=tree.workers,
        prompt_tokens=[tree.prompt_tokens[name] for name in tree.workers],
        nodes=[_node_proto(node, tree.workers) for node in tree.nodes],
        answers=[
            orchestrator_pb2.TreeAnswer(text=a.text, ends_with_eos=a.ends_with_eos, scores=scores_proto(a.scores))
            for a in tree.answers
        ],
        complete=tree.complete,
    )


def _node_proto(node: TreeNode, workers: list[str]) -> orchestrator_pb2.TreeNode:
    message = orchestrator_pb2.TreeNode(
        text=node.text,
        answer_tokens=[node.answer_tokens[name] for name in workers] if node.visited else [],
        candidates=[candidate_proto(c) for c in node.candidates],
        branches=[
            orchestrator_pb2.TreeBranch(node=b.node)
            if b.node is not None
            else orchestrator_pb2.TreeBranch(answer=b.answer, finish_reason=FINISH_PROTO[b.finish or Finish.LENGTH])
            for b in node.branches
        ],
    )
    if node.repetition_cut is not None:
        message.repetition_cut = node.repetition_cut
    return message


# ---- back from messages ---------------------------------------------------------------------


def tree_from_proto(message: orchestrator_pb2.FusionTree) -> FusionTree:
    workers = list(message.workers)
    return FusionTree(
        workers=workers,
        prompt_tokens=dict(zip(workers, message.prompt_tokens)),
        nodes=[_node_from_proto(node, workers) for node in message.nodes],
        answers=[TreeAnswer(a.text, a.ends_with_eos, _scores(a.scores)) for a in message.answers],
        complete=message.complete,
    )


def _node_from_proto(message: orchestrator_pb2.TreeNode, workers: list[str]) -> TreeNode:
    return TreeNode(
        text=message.text,
        answer_tokens=dict(zip(workers, message.answer_tokens)),
        candidates=[
            StepCandidate(c.text, c.ends_with_eos, list(c.proposed_by), _scores(c.scores), c.fused_score)
            for c in message.candidates
        ],
        branches=[
            TreeBranch(node=b.node)
            if b.WhichOneof("next") == "node"
            else TreeBranch(answer=b.answer, finish=_FINISH_OF[b.finish_reason])
            for b in message.branches
        ],
        repetition_cut=message.repetition_cut if message.HasField("repetition_cut") else None,
    )


def _scores(messages) -> dict[str, CandidateScore]:
    # The context length after the text is not part of a ModelScore; nothing offline needs it.
    return {s.worker: CandidateScore(s.scored_tokens, s.log_prob_sum, 0) for s in messages}
