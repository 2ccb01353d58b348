"""Constants shared by the tests (the known answers come from tests/common/mod.rs)."""

from __future__ import annotations

from pathlib import Path

#: The repository root (bindings/python/tests/../../..).
REPO = Path(__file__).resolve().parents[3]

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: Known greedy answer of the model to PARIS_CHAT (tests/common/mod.rs).
PARIS_CHAT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
]
PARIS_PROMPT_HEAD = [1, 9690, 198, 2683, 359, 253]
PARIS_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, 2]
PARIS_TEXT = "The capital of France is Paris."

QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Name three colors.",
    "Explain in one sentence why the sky is blue, and mention the scientist who first described the effect.",
    "What is 12 plus 30?",
    "Write a haiku about the sea.",
    "List the planets of the solar system in order from the sun, separated by commas, and say which one is largest.",
    "Who wrote Hamlet?",
]

