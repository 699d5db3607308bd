"""Cartridges (PEFT 0.21 ``CartridgeConfig``): long trained KV prefixes whose first tokens are frozen.

Against PEFT itself: an adapter PEFT wrote loads with PEFT's logits and PEFT's gradients for the
trainable tokens; ours exports back as a CARTRIDGE adapter that PEFT loads with the same logits.
Frozen tokens get no gradient and an optimizer with weight decay leaves them unchanged. A prefix
initialized from a text read in chunks equals the text read at once and gives the base model's
logits after that text (the independent reference).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not hasattr(peft, "CartridgeConfig"):
    pytest.skip("this PEFT has no CartridgeConfig", allow_module_level=True)

from tiny_models import DEVICE, VOCAB, padded_batch, positions, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning, from_peft_adapter  # noqa: E402

P, FROZEN = 6, 2


def _peft_cartridge(model, p=P, frozen=FROZEN, seed=5):
    cartridge = peft.get_peft_model(model, peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=p,
                                                                num_frozen_tokens=frozen))
    torch.manual_seed(seed)
    cartridge.prompt_encoder["default"].reset_parameters()
    return cartridge


def test_peft_cartridge_loads_with_peft_logits_and_gradients(tmp_path):
    model, other = tiny_model("llama"), tiny_model("llama")
    reference = _peft_cartridge(other)
    reference.save_pretrained(tmp_path)
    wrapped = from_peft_adapter(model, tmp_path)
    assert wrapped.spec.num_frozen_tokens == FROZEN
    assert wrapped.frozen_prefix.shape == (1, FROZEN, wrapped.spec.width) and not wrapped.frozen_prefix.requires_grad
    reference.train()  # PEFT's trainable tokens get gradients in training mode only
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    ours = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    valid = mask.bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], atol=2e-5, rtol=1e-5)
    ours.loss.backward()
    ref.loss.backward()
    encoder = reference.prompt_encoder["default"]
    assert encoder.frozen_embedding.grad is None and wrapped.frozen_prefix.grad is None
    assert encoder.trainable_embedding.grad.abs().max() > 0
    torch.testing.assert_close(wrapped.prefix_embedding.grad[0], encoder.trainable_embedding.grad, atol=2e-5, rtol=1e-4)


def test_frozen_tokens_survive_an_optimizer_with_weight_decay():
    wrapped = add_prefix_tuning(tiny_model("llama"), P, num_frozen_tokens=FROZEN)
    frozen, trainable = wrapped.frozen_prefix.detach().clone(), wrapped.prefix_embedding.detach().clone()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    assert params == [wrapped.prefix_embedding]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    ids, mask = padded_batch()
    for _ in range(3):
        wrapped(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(wrapped.frozen_prefix, frozen)
    assert not torch.equal(wrapped.prefix_embedding, trainable)


def test_cartridge_exports_back_to_peft(tmp_path):
    wrapped = add_prefix_tuning(tiny_model("llama"), P, num_frozen_tokens=FROZEN)
    with torch.no_grad():
        wrapped.prefix_embedding.mul_(2)
    wrapped.save_peft_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "CARTRIDGE" and config["num_frozen_tokens"] == FROZEN
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        ours = wrapped(input_ids=ids, attention_mask=mask).logits
        theirs = loaded(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[valid], theirs[valid], atol=2e-5, rtol=1e-5)
    again = from_peft_adapter(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(again.prefix_table(), wrapped.prefix_table(), atol=0, rtol=0)


def test_cartridge_prefix_checkpoint_round_trip(tmp_path):
    wrapped = add_prefix_tuning(tiny_model("gpt2"), P, num_frozen_tokens=FROZEN, num_prefixes=2)
    wrapped.save_prefix(tmp_path)
    other = add_prefix_tuning(tiny_model("gpt2"), P, num_frozen_tokens=FROZEN, num_prefixes=2).load_prefix(tmp_path)
    torch.testing.assert_close(other.prefix_table(), wrapped.prefix_table(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_frozen_tokens is 2 in the file, but 1"):
        add_prefix_tuning(tiny_model("gpt2"), P, num_frozen_tokens=1, num_prefixes=2).load_prefix(tmp_path)


def test_bad_frozen_token_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_frozen_tokens must be an int in \[0, num_virtual_tokens=6\]"):
        add_prefix_tuning(tiny_model("llama"), P, num_frozen_tokens=7)
    with pytest.raises(ValueError, match="MLP"):
        add_prefix_tuning(tiny_model("llama"), P, num_frozen_tokens=1, projection_hidden=8)
    _peft_cartridge(tiny_model("llama")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_frozen_tokens is 2 in the file, but 3"):
        from_peft_adapter(tiny_model("llama"), tmp_path, num_frozen_tokens=3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_long_text_init_in_chunks_equals_reading_the_text(family):
    """A 40-token text read 7 tokens at a time: the same prefix as read at once, and on new input the
    base model's logits after reading the text (positions 0..P-1, then P..)."""
    p = 40
    text = torch.randint(3, VOCAB, (p,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    base = tiny_model(family)
    wrapped = add_prefix_tuning(copy.deepcopy(base), p, init=text, num_frozen_tokens=1)
    torch.testing.assert_close(wrapped.text_table(text, chunk_tokens=7), wrapped.text_table(text, chunk_tokens=p),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wrapped.text_table(text, chunk_tokens=7)[0], wrapped.prefix_table()[0].float(),
                               atol=1e-5, rtol=1e-5)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        ours = wrapped(input_ids=ids).logits
        ref = base(input_ids=torch.cat([text.expand(2, -1), ids], 1)).logits[:, p:]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
