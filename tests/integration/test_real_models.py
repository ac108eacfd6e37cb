"""The default pair of real models, served by real worker processes, fused exactly like the reference."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from coolfusion.v1 import orchestrator_pb2 as opb
from coolfusion.v1 import orchestrator_pb2_grpc, worker_pb2, worker_pb2_grpc
from coolfusion.worker import model_files
from coolfusion.worker.hf import loading

from reference import PAPER_STRATEGY, ReferenceModel, reference_fuse
from worker_probes import REAL_PAIR

pytestmark = pytest.mark.real_model

GSM8K = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"
INSTRUCTION = "Solve the problem step by step, then give the final answer on its own line as '#### <number>'."


def gsm8k_prompt(index: int) -> list[dict]:
    with GSM8K.open() as lines:
        question = json.loads(next(line for i, line in enumerate(lines) if i == index))["question"]
    return [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]


@pytest.fixture(scope="module")
def references() -> dict[str, ReferenceModel]:
    models = {}
    for name, preset in REAL_PAIR.items():
        model, tokenizer = loading.load_model(model_files.resolve_model_folder(preset=preset))
        models[name] = ReferenceModel(name, model, tokenizer)
    return models


def chat(text: str) -> worker_pb2.Prompt:
    return worker_pb2.Prompt(
        chat=worker_pb2.ChatConversation(messages=[worker_pb2.ChatMessage(role="user", content=text)])
    )


def test_both_default_models_produce_sensible_greedy_segments(real_pair):
    prompts = {
        "smollm2": chat("What is the capital of France?"),
        "gemma3": worker_pb2.Prompt(text="Q: What is the capital of France?\nA: The capital of France is"),
    }
    for name, prompt in prompts.items():
        with grpc.insecure_channel(real_pair.workers[name].address) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            opened = stub.OpenSession(worker_pb2.OpenSessionRequest(prompt=prompt), timeout=60)
            context, text, append = opened.context_tokens, "", ""
            for _ in range(6):
                segment = stub.GenerateSegment(
                    worker_pb2.GenerateSegmentRequest(
                        session_id=opened.session_id, expected_context_tokens=context, append_text=append
                    ),
                    timeout=60,
                )
                context, append, text = segment.context_tokens, segment.text, text + segment.text
                if segment.finish_reason == worker_pb2.FINISH_REASON_EOS:
                    break
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=opened.session_id), timeout=10)
        assert "Paris" in text, (name, text)


@pytest.mark.parametrize("index", [0, 1])
def test_fused_gsm8k_answer_equals_the_reference(real_pair, references, index):
    prompt = gsm8k_prompt(index)
    with grpc.insecure_channel(real_pair.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = opb.FuseRequest(
            parameters=opb.FusionParameters(
                prompt=chat(prompt[0]["content"]), max_new_tokens=64, strategy=PAPER_STRATEGY
            )
        )
        result = stub.Fuse(request, timeout=900).result
    expected, _ = reference_fuse([references["smollm2"], references["gemma3"]], prompt, max_new_tokens=64)
    assert result.text == expected
    assert not result.dropped


def test_smollm2_alone_equals_plain_transformers_greedy_generate(real_pair, references):
    prompt = [{"role": "user", "content": "Name three primary colours."}]
    with grpc.insecure_channel(real_pair.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        parameters = opb.FusionParameters(
            prompt=chat(prompt[0]["content"]), workers=["smollm2"], max_new_tokens=40, strategy=PAPER_STRATEGY
        )
        result = stub.Fuse(opb.FuseRequest(parameters=parameters), timeout=600).result
    model = references["smollm2"]
    rendered, special = model.render(prompt)
    ids = torch.tensor([model.ids(rendered, special)])
    out = model.model.generate(ids, max_new_tokens=60, do_sample=False)
    greedy = model.decode(out[0, ids.shape[1] :].tolist()).split("<|im_end|>")[0]
    # The fused answer stops at the first segment past 40 tokens; greedy ran further.
    assert result.text and greedy.startswith(result.text), (result.text, greedy)
