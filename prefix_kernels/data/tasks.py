"""Collators for the other two tasks of ``prefix-kernels train``: text/label classification (an
encoder with a classification head) and source/target seq2seq (an encoder-decoder, teacher-forced).
Both pad on the right, as encoders are fed; examples come from ``load_jsonl(path, task)``."""

from __future__ import annotations

import torch


def label_names(train: list[dict], held_out: list[dict]) -> list:
    """The label set of the training examples (sorted), the index of each label its class id.
    Raises ValueError naming a held-out example whose label no training example has, or a set of
    fewer than two labels."""
    names = sorted({ex["label"] for ex in train})
    if len(names) < 2:
        raise ValueError(f"the training examples have {len(names)} label(s) ({names}); classification needs two "
                         "or more")
    known = set(names)
    for i, ex in enumerate(held_out):
        if ex["label"] not in known:
            raise ValueError(f"held-out example {i + 1} of {len(held_out)} ({ex['text'][:40]!r}) has label "
                             f"{ex['label']!r}, which no training example has (the training labels: {names})")
    return names


class ClassificationCollator:
    """Examples -> {"input_ids", "attention_mask", "labels" [B]}: texts cut to ``max_length``
    tokens (with the tokenizer's special tokens), right-padded; labels as indices into ``labels``."""

    def __init__(self, tokenizer, labels: list, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.index = {label: i for i, label in enumerate(labels)}

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("an empty batch")
        batch = self.tokenizer([ex["text"] for ex in examples], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor([self.index[ex["label"]] for ex in examples])}


class Seq2SeqCollator:
    """Examples -> {"input_ids", "attention_mask", "labels"}: the source cut to ``max_length``
    tokens, right-padded; the target (with the tokenizer's end token) as labels, padded with -100,
    from which the model makes its teacher-forced decoder inputs. A target longer than
    ``max_length`` raises ValueError (it would be trained cut)."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer, self.max_length = tokenizer, max_length
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token to pad the sources with")

    def _target(self, where: str, ex: dict) -> list[int]:
        ids = self.tokenizer(text_target=ex["target"])["input_ids"]
        if len(ids) > self.max_length:
            raise ValueError(f"{where} (source {ex['source'][:40]!r}...): its target is {len(ids)} tokens, more "
                             f"than max_length={self.max_length}")
        return ids

    def check(self, examples: list[dict], what: str = "") -> None:
        """Refuses a target longer than ``max_length`` up front, naming "<what> example <i> of <n>"."""
        for i, ex in enumerate(examples):
            self._target(f"{what} example {i + 1} of {len(examples)}".strip(), ex)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("an empty batch")
        batch = self.tokenizer([ex["source"] for ex in examples], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        targets = [self._target(f"example {i}", ex) for i, ex in enumerate(examples)]
        labels = torch.full((len(targets), max(map(len, targets))), -100, dtype=torch.long)
        for i, ids in enumerate(targets):
            labels[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
