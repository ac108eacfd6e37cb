"""The GSM8K evaluation prompt: an instruction and two worked examples of the project's own, as a chat.

`coolfusion eval` sends every question as a few-shot chat, laid out so that both kinds of worker
answer in the same shape (no system turn, which base models and some chat templates handle badly):

    user:      Solve the last question. Reason step by step, then give the final answer on its own line as: #### <number>

               Question: A gardener plants 7 rows of tulips with 8 tulips in each row. Rabbits eat 13 of the tulips. How many tulips are left?
    assistant: The gardener plants 7 * 8 = 56 tulips. After the rabbits eat 13, there are 56 - 13 = 43 tulips left.
               #### 43
    user:      Question: Nora rides her bike 9 kilometres to school and back every weekday. How many kilometres does she ride in 3 weeks of 5 school days?
    assistant: One day she rides 9 * 2 = 18 kilometres. In 3 * 5 = 15 days she rides 18 * 15 = 270 kilometres.
               #### 270
    user:      Question: <the GSM8K question>

- An instruct model reads this through its chat template: the examples are earlier turns of the
  conversation, so it answers the last question in their layout. (Put in one user message, a small
  chat model such as Qwen2.5-Coder-0.5B answered an example's question, `#### 270`, instead.)
- A base model has no template: its worker renders the turns as plain paragraphs, each followed by
  a blank line, so the text it continues ends in "Question: ...\n\n", exactly where each example's
  solution begins; it imitates the examples.
- The stop string "\nQuestion:" ends the answer where a base model would go on to invent the
  next question.

The examples are written for this project (not taken from GSM8K), so no test item leaks into the
prompt; both end with `#### N`, the marker the answer extraction looks for first.
"""

from __future__ import annotations

INSTRUCTION = (
    "Solve the last question. Reason step by step, then give the final answer on its own line as: #### <number>"
)
# (question, worked solution ending in "#### N"); simple two-step arithmetic, like GSM8K's easier items.
EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        (
            "A gardener plants 7 rows of tulips with 8 tulips in each row. Rabbits eat 13 of the tulips. "
            "How many tulips are left?"
        ),
        "The gardener plants 7 * 8 = 56 tulips. After the rabbits eat 13, there are 56 - 13 = 43 tulips left.\n#### 43",
    ),
    (
        (
            "Nora rides her bike 9 kilometres to school and back every weekday. "
            "How many kilometres does she ride in 3 weeks of 5 school days?"
        ),
        "One day she rides 9 * 2 = 18 kilometres. In 3 * 5 = 15 days she rides 18 * 15 = 270 kilometres.\n#### 270",
    ),
)
# Where a base model, imitating the examples, would start a question of its own.
STOP_STRINGS = ("\nQuestion:",)


def gsm8k_text(question: str) -> str:
    """The user message for one question: instruction, worked examples, then the question."""
    shots = "".join(f"Question: {q}\n\n{solution}\n\n" for q, solution in EXAMPLES)
    return f"{INSTRUCTION}\n\n{shots}Question: {question.strip()}"


def gsm8k_prompt(question: str) -> list[dict[str, str]]:
    """The chat prompt `coolfusion eval` sends for one question: the examples as earlier turns."""
    turns = []
    for n, (shot, solution) in enumerate(EXAMPLES):
        asked = f"{INSTRUCTION}\n\nQuestion: {shot}" if n == 0 else f"Question: {shot}"
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": solution}]
    return [*turns, {"role": "user", "content": f"Question: {question.strip()}"}]
