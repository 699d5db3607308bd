"""No hidden state in the transformers integration: each wrapped model's per-call state is its own.

Three wrapped models with different settings live in one process and run interleaved -- a bank of
prefixes that trains, a model whose layers drop keyword arguments (its prefix is handed to the
attention modules) that generates between the training steps, one with a sliding window -- one
model's forward even runs inside another's ``generate()`` (from a logits processor). Each is
checked against its own reference: PEFT with the same prefix for the logits, a step-by-step full
forward for ``generate()``. And the call-path modules of ``prefix_kernels/hf`` are read for module
state: no ``global``, no module-level variable rebound or mutated, no attribute of ours written
onto a transformers module.
"""

from __future__ import annotations

import ast
import copy
import pathlib

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_models import DEVICE, VOCAB, padded_batch, positions  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0)


def _pair(config_class, model_class, seed, **overrides):
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SMALL, **overrides})).to(DEVICE).eval()
    return model, copy.deepcopy(model)


def _peft(model, p):
    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))


@torch.no_grad()
def _check_against_peft(wrapped, reference, ids, mask, prefix_ids=None):
    """Row by row: the wrapped model's logits equal PEFT's with that row's prefix of the bank."""
    ours = wrapped(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits
    for row in range(ids.shape[0]):
        index = 0 if prefix_ids is None else int(prefix_ids[row])
        reference.prompt_encoder["default"].embedding.weight.copy_(wrapped.prefix_embedding[index])
        want = reference(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                         position_ids=positions(mask[row:row + 1])).logits[0]
        keep = mask[row].bool()
        torch.testing.assert_close(ours[row][keep], want[keep], atol=3e-5, rtol=1e-5)


@torch.no_grad()
def _greedy_by_full_forward(wrapped, ids, mask, steps):
    """Greedy decoding by a full forward per step, end-of-sequence excluded (as min_new_tokens does)."""
    eos = wrapped.generation_config.eos_token_id
    for _ in range(steps):
        logits = wrapped(input_ids=ids, attention_mask=mask).logits[:, -1]
        if eos is not None:
            logits[:, eos] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


class _ForwardOf:
    """A logits processor that runs another model's forward at every step of a ``generate()``."""

    def __init__(self, model, ids, mask, prefix_ids):
        self.model, self.ids, self.mask, self.prefix_ids = model, ids, mask, prefix_ids
        self.logits = []

    def __call__(self, input_ids, scores):
        with torch.no_grad():
            self.logits.append(self.model(input_ids=self.ids, attention_mask=self.mask,
                                          prefix_ids=self.prefix_ids).logits)
        return scores


def test_wrapped_models_with_different_settings_run_interleaved():
    import transformers as tf

    bank, bank_ref = _pair(tf.LlamaConfig, tf.LlamaForCausalLM, 0)
    dropper, dropper_ref = _pair(tf.NemotronConfig, tf.NemotronForCausalLM, 1, partial_rotary_factor=0.5)
    windowed, windowed_ref = _pair(tf.MistralConfig, tf.MistralForCausalLM, 2, sliding_window=8)
    a = add_prefix_tuning(bank, 4, num_prefixes=3)
    b = add_prefix_tuning(dropper, 2)
    c = add_prefix_tuning(windowed, 3)
    assert b.plan.handover and not a.plan.handover  # the two ways a prefix reaches attention
    assert {layer.sliding_window for layer in c.attention_layers.values()} == {8}
    a_ref, b_ref, c_ref = _peft(bank_ref, 4), _peft(dropper_ref, 2), _peft(windowed_ref, 3)
    with torch.no_grad():
        b.prefix_embedding.mul_(3)  # strong enough to steer the argmax
    ids, mask = padded_batch(batch=3, length=5)  # within the window less the prefix: PEFT's semantics too
    gen_ids, gen_mask = padded_batch(batch=3, length=5, left=False)
    gen_mask = gen_mask.flip(1)  # generation pads on the left
    gen_ids = gen_ids.masked_fill(gen_mask == 0, 0)
    pick = torch.tensor([2, 0, 1], device=DEVICE)
    optimizer = torch.optim.SGD([a.prefix_embedding], lr=0.5)
    a.train()
    for step in range(3):
        loss = a(input_ids=ids, attention_mask=mask, labels=ids, prefix_ids=pick).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        # b generates between a's training steps, with a's forward inside its generate()
        inner = _ForwardOf(a.eval(), ids, mask, pick)
        got = b.generate(input_ids=gen_ids, attention_mask=gen_mask, do_sample=False, max_new_tokens=3,
                         min_new_tokens=3, pad_token_id=0, logits_processor=[inner])
        a.train()
        assert torch.equal(got, _greedy_by_full_forward(b, gen_ids, gen_mask, 3))
        assert len(inner.logits) == 3
        with torch.no_grad():
            want = a.eval()(input_ids=ids, attention_mask=mask, prefix_ids=pick).logits
        for logits in inner.logits:
            torch.testing.assert_close(logits, want)
        _check_against_peft(a, a_ref, ids, mask, pick)
        _check_against_peft(b, b_ref, ids, mask)
        _check_against_peft(c, c_ref, ids, mask)
        a.train()
    for wrapped in (a, b, c):
        assert not wrapped._scope.calls and wrapped._scope.generation is None


# ---- module state on the call path, read from the source ------------------------------------------
HF = pathlib.Path(__file__).resolve().parents[1] / "prefix_kernels" / "hf"
# what a module-level table may be built from: it is a constant if nothing rebinds or mutates it
_MUTATORS = {"append", "extend", "insert", "pop", "popitem", "clear", "update", "setdefault", "add", "discard",
             "remove", "__setitem__", "__delitem__"}
# the one call-scoped value (argued in its comment): the probe in progress, set and reset around one forward
_CONTEXT_VARIABLES = {("probe.py", "_probing")}


def _module_names(tree) -> dict[str, list[ast.stmt]]:
    names: dict[str, list[ast.stmt]] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    names.setdefault(name.id, []).append(node)
    return names


def _state_findings(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = _module_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            found.append(f"{where}: {type(node).__name__.lower()} {', '.join(node.names)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in names:
            found.append(f"{where}: module-level {node.func.value.id!r} mutated ({node.func.attr})")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and \
                        target.value.id in names and node not in tree.body:
                    found.append(f"{where}: module-level {target.value.id!r} mutated (item assignment)")
                if isinstance(target, ast.Attribute) and target.attr.startswith("prefix_kernels"):
                    found.append(f"{where}: attribute {target.attr!r} written onto an object")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            found.append(f"{where}: setattr")
    for name, nodes in names.items():
        if len(nodes) > 1:
            found.append(f"{path.name}:{nodes[1].lineno}: module-level {name!r} bound more than once")
        value = getattr(nodes[0], "value", None)
        if isinstance(value, ast.Constant) and value.value is None:
            found.append(f"{path.name}:{nodes[0].lineno}: module-level {name!r} = None (a slot for state)")
        if isinstance(value, ast.Call) and "ContextVar" in ast.unparse(value.func) and \
                (path.name, name) not in _CONTEXT_VARIABLES:
            found.append(f"{path.name}:{nodes[0].lineno}: module-level ContextVar {name!r}")
    return found


def test_no_module_state_on_the_call_path():
    modules = sorted(HF.glob("*.py"))
    assert {p.name for p in modules} >= {"attention.py", "masks.py", "probe.py", "calls.py", "legacy.py", "model.py",
                                         "routing.py", "wrapping.py"}
    found = [finding for path in modules for finding in _state_findings(path)]
    assert not found, "module-level state in prefix_kernels/hf:\n" + "\n".join(found)


def test_the_state_check_finds_module_state(tmp_path):
    """The check above can fail: it finds each pattern it looks for."""
    source = ("active = None\nTABLE = {}\n\ndef f(module, x):\n    global active\n    active = x\n"
              "    TABLE[x] = 1\n    TABLE.update(a=1)\n    module.prefix_kernels_call = x\n")
    path = tmp_path / "example.py"
    path.write_text(source)
    found = "\n".join(_state_findings(path))
    for pattern in ("global active", "'active' = None", "'TABLE' mutated (item", "'TABLE' mutated (update)",
                    "'prefix_kernels_call' written"):
        assert pattern in found, (pattern, found)
