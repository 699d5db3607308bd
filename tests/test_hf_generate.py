"""generate() with the KV cache (real tokens only; the prefix read from parameters at every step).

The reference runs a full forward over everything so far and takes the argmax, step by step. (PEFT
0.21's own generate() drops the prefix under transformers 5.24 -- its first-step scores equal the
base model's -- so it cannot be the reference.)
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import DEVICE, FAMILIES, padded_batch, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

P = 4
STEPS = 6


def no_stopping(wrapped):
    """Random tiny models emit EOS at random: make every run take exactly STEPS steps."""
    return dict(max_new_tokens=STEPS, min_new_tokens=STEPS, pad_token_id=0)


@torch.no_grad()
def greedy_by_full_forward(wrapped, ids, mask, prefix_ids=None):
    for _ in range(STEPS):
        logits = wrapped(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def left_padded(seed=1):
    ids, mask = padded_batch(batch=3, length=7, seed=seed, left=False)
    mask = mask.flip(1)  # generation pads on the left
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_full_forward_argmax(family):
    wrapped = add_prefix_tuning(tiny_model(family), P)
    with torch.no_grad():
        wrapped.prefix_embedding.mul_(3)  # a prefix strong enough to change the argmax
    ids, mask = left_padded()
    got = wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=False, **no_stopping(wrapped))
    want = greedy_by_full_forward(wrapped, ids, mask)
    assert torch.equal(got, want)
    with torch.no_grad():  # the prefix matters, so the comparison can fail
        base = tiny_model(family)(input_ids=ids, attention_mask=mask).logits[:, -1]
        ours = wrapped(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert (ours - base).abs().max() > 1e-3


def test_generate_with_a_prefix_bank():
    wrapped = add_prefix_tuning(tiny_model("qwen2"), P, num_prefixes=3)
    with torch.no_grad():
        wrapped.prefix_embedding.mul_(3)
    ids, mask = left_padded(seed=4)
    choice = torch.tensor([1, 2, 0], device=DEVICE)
    got = wrapped.generate(input_ids=ids, attention_mask=mask, prefix_ids=choice, do_sample=False,
                           **no_stopping(wrapped))
    assert torch.equal(got, greedy_by_full_forward(wrapped, ids, mask, choice))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_scores_equal_full_forward_log_likelihood(family):
    """Beams reorder the cache and expand prefix_ids; each returned beam's score (length_penalty=0:
    the sum of its tokens' log-probabilities) must equal what a full forward gives that sequence."""
    wrapped = add_prefix_tuning(tiny_model(family), P, num_prefixes=2)
    ids, mask = left_padded(seed=2)
    choice = torch.tensor([1, 0, 1], device=DEVICE)
    out = wrapped.generate(input_ids=ids, attention_mask=mask, prefix_ids=choice, num_beams=3,
                           num_return_sequences=2, length_penalty=0.0, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, **no_stopping(wrapped))
    seqs = out.sequences
    rows = torch.arange(3, device=DEVICE).repeat_interleave(2)
    full_mask = torch.cat([mask[rows], torch.ones_like(seqs[:, ids.shape[1]:])], 1)
    with torch.no_grad():
        logits = wrapped(input_ids=seqs, attention_mask=full_mask, prefix_ids=choice[rows]).logits
    logp = logits[:, ids.shape[1] - 1:-1].log_softmax(-1)
    new = seqs[:, ids.shape[1]:]
    total = logp.gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, total, atol=1e-4, rtol=1e-4)


def test_sampling_runs_and_top_k_1_is_greedy():
    wrapped = add_prefix_tuning(tiny_model("gemma"), P)
    ids, mask = left_padded(seed=3)
    torch.manual_seed(0)
    sampled = wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=1,
                               **no_stopping(wrapped))
    assert torch.equal(sampled, greedy_by_full_forward(wrapped, ids, mask))
    torch.manual_seed(0)
    free = wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.5,
                            **no_stopping(wrapped))
    assert free.shape == (3, ids.shape[1] + STEPS)


def test_generate_with_reparameterized_prefix_evaluates_the_mlp_once():
    wrapped = add_prefix_tuning(tiny_model("llama"), P, projection_hidden=16)
    calls = []
    wrapped.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    ids, mask = left_padded(seed=5)
    wrapped.generate(input_ids=ids, attention_mask=mask, do_sample=False, **no_stopping(wrapped))
    assert len(calls) == 1
