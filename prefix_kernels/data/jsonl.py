"""JSONL data with line-numbered errors -- prompt/completion (causal LMs), source/target (seq2seq),
text/label (classification) -- a train/eval split, and a left-padding prompt/completion collator
whose labels cover only the completion (plus EOS)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

SPLITS = ("train", "eval")
# per task: the fields every line needs, the types each takes, and the one that must not be blank
FIELDS = {"causal": ({"prompt": (str,), "completion": (str,)}, "completion"),
          "seq2seq": ({"source": (str,), "target": (str,)}, "target"),
          "classification": ({"text": (str,), "label": (str, int)}, "text")}
_TYPE_NAMES = {(str,): "a string", (str, int): "a string or an int"}


def demo_task_path() -> Path:
    """The packaged demo task (restaurant records -> one sentence, E2E-like)."""
    return Path(str(resources.files(__package__) / "demo_task.jsonl"))


def _check(obj, where: str, task: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fields, not_blank = FIELDS[task]
    for key, types in fields.items():
        if key not in obj:
            raise ValueError(f'{where}: missing "{key}"{_other_task_hint(obj, task)}')
        if not isinstance(obj[key], types) or isinstance(obj[key], bool):
            raise ValueError(f'{where}: "{key}" must be {_TYPE_NAMES[types]}, got {type(obj[key]).__name__}')
        if isinstance(obj[key], str):
            _check_unicode(obj[key], f'{where}: "{key}"')
    if not obj[not_blank].strip():
        raise ValueError(f'{where}: empty "{not_blank}"')
    if "split" in obj and obj["split"] not in SPLITS:
        raise ValueError(f'{where}: unknown "split" value {obj["split"]!r} (expected "train" or "eval")')
    return obj


def _other_task_hint(obj: dict, task: str) -> str:
    """Where a line has every field of another task: which (the usual cause of a missing field)."""
    for other, (fields, _) in FIELDS.items():
        if other != task and all(key in obj for key in fields):
            names = " and ".join(f'"{key}"' for key in fields)
            return f" (it has {names}, the fields of --task {other})"
    return ""


def _check_unicode(text: str, what: str) -> None:
    """JSON's \\uXXXX escapes can spell half a UTF-16 pair, a string no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start} (an unpaired \\u{ord(text[e.start]):04x} escape?)") from None


def load_jsonl(path, task: str = "causal") -> list[dict]:
    """One object per line with the fields of ``task`` (:data:`FIELDS`): {"prompt", "completion"}
    ("causal"), {"source", "target"} ("seq2seq") or {"text", "label"} ("classification"; labels
    all strings or all ints), each with an optional "split"; blank lines are skipped. Raises
    ValueError naming ``path:line`` on the first bad line (not UTF-8, not JSON, nested too deeply,
    a field missing, of the wrong type or not valid Unicode), or on a file without examples."""
    if task not in FIELDS:
        raise ValueError(f"task must be one of {tuple(FIELDS)}, got {task!r}")
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            except RecursionError:  # the decoder recurses once per nested array/object
                raise ValueError(f"{path}:{lineno}: JSON nested too deeply (expected one flat object)") from None
            examples.append(_check(obj, f"{path}:{lineno}", task))
            label = examples[-1].get("label") if task == "classification" else None
            if label is not None and type(label) is not type(examples[0]["label"]):
                raise ValueError(f'{path}:{lineno}: "label" is {label!r}, but the first example\'s is '
                                 f'{examples[0]["label"]!r}: labels must be all strings or all ints')
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def split(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, eval) by the "split" field (unmarked examples train); when no example carries it,
    the last 10% (at least 1) is held out. Raises ValueError when either side would be empty."""
    if any("split" in ex for ex in examples):
        train = [ex for ex in examples if ex.get("split", "train") == "train"]
        held = [ex for ex in examples if ex.get("split") == "eval"]
    else:
        n_eval = max(1, len(examples) // 10)
        train, held = examples[:-n_eval], examples[-n_eval:]
    if not train:
        raise ValueError("no training examples")
    if not held:
        raise ValueError('no held-out examples (mark some with "split": "eval")')
    return train, held


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    return pad


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]  # with the tokenizer's own special tokens (BOS, if any)


def _left_pad(rows: list[list[int]], pad: int, fill_labels: list[list[int]] | None = None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, -len(row):] = torch.tensor(row)
            mask[i, -len(row):] = 1
            if fill_labels is not None:
                labels[i, -len(row):] = torch.tensor(fill_labels[i])
    return ids, mask, labels


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``prompts``, left-padded for batched generation."""
    ids, mask, _ = _left_pad([_prompt_ids(tokenizer, p) for p in prompts], _pad_id(tokenizer))
    return ids, mask


class PromptCompletionCollator:
    """Examples -> {"input_ids", "attention_mask", "labels"}, left-padded. Labels are -100 on the
    prompt and padding; the completion is followed by EOS (learned) when the tokenizer has one. Too
    long a pair loses prompt tokens from the left (a leading BOS is kept); the completion is never
    cut, and one longer than ``max_length`` raises ValueError."""

    def __init__(self, tokenizer, max_length: int = 256):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = _pad_id(tokenizer)

    def _encode(self, where: str, ex: dict) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        prompt = _prompt_ids(tok, ex["prompt"])
        completion = tok(ex["completion"], add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            completion = completion + [tok.eos_token_id]
        if len(completion) > self.max_length:
            raise ValueError(f"{where} (prompt {ex['prompt'][:40]!r}...): its completion is "
                             f"{len(completion)} tokens, more than max_length={self.max_length}")
        keep = self.max_length - len(completion)
        if len(prompt) > keep:
            bos = tok.bos_token_id
            head = prompt[:1] if keep > 0 and bos is not None and prompt[0] == bos else []
            prompt = head + prompt[len(prompt) - keep + len(head):]
        return prompt + completion, [-100] * len(prompt) + completion

    def check(self, examples: list[dict], what: str = "") -> None:
        """Encodes every example once (no padding, nothing kept), so that a completion longer than
        ``max_length`` is refused up front, not when its batch comes: ValueError naming it as
        "<what> example <i> of <n>" (1-based)."""
        for i, ex in enumerate(examples):
            self._encode(f"{what} example {i + 1} of {len(examples)}".strip(), ex)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("an empty batch")
        rows, labels = zip(*(self._encode(f"example {i}", ex) for i, ex in enumerate(examples)))
        ids, mask, label_tensor = _left_pad(list(rows), self.pad_id, list(labels))
        return {"input_ids": ids, "attention_mask": mask, "labels": label_tensor}
