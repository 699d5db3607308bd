"""prefix_kernels.data: the packaged demo task, JSONL validation, split, and the collator (with tiny
word-level tokenizers built here; no downloads)."""

import json
import re

import pytest
import torch

from prefix_kernels.data import PromptCompletionCollator, demo_task_path, encode_prompts, load_jsonl, split

WORDS = "a b c d e f g h".split()


def word_tokenizer(bos: bool = False, pad: bool = True, eos: bool = True):
    """Whitespace WordLevel tokenizer: <pad>=0 <eos>=1 <unk>=2 <bos>=3, then a..h = 4..11."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    special = {"unk_token": "<unk>", "pad_token": "<pad>" if pad else None, "eos_token": "<eos>" if eos else None,
               "bos_token": "<bos>" if bos else None}
    return PreTrainedTokenizerFast(tokenizer_object=core, **{k: v for k, v in special.items() if v})


def ids(text: str) -> list[int]:
    return [4 + WORDS.index(w) for w in text.split()]


# -- the packaged demo task ------------------------------------------------------------------------

def test_demo_task_loads_and_splits():
    examples = load_jsonl(demo_task_path())
    train, held = split(examples)
    assert len(train) >= 300 and len(held) == 32
    assert held == examples[-32:] and all(ex["split"] == "eval" for ex in held)
    prompts = [ex["prompt"] for ex in examples]
    assert len(set(prompts)) == len(prompts)


def test_demo_task_format_and_lengths():
    for ex in load_jsonl(demo_task_path()):
        prompt, completion = ex["prompt"], ex["completion"]
        assert re.fullmatch(r"name\[[^\]]+\]( \| \w+\[[^\]]+\])+\nDescription:", prompt), prompt
        assert completion.startswith(" ") and completion.endswith(".") and "\n" not in completion
        name = re.match(r"name\[([^\]]+)\]", prompt).group(1)
        assert name in completion
        # words + punctuation: a lower bound on BPE tokens (the file was generated with <= 59 BPE tokens)
        assert len(re.findall(r"\w+|[^\w\s]", prompt + completion)) < 60
        assert len(prompt) <= 140 and len(completion) <= 130


# -- load_jsonl validation -------------------------------------------------------------------------

GOOD = json.dumps({"prompt": "a", "completion": " b"})


@pytest.mark.parametrize("bad, message", [
    ("{not json", "invalid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"completion": " b"}', 'missing "prompt"'),
    ('{"prompt": 3, "completion": " b"}', '"prompt" must be a string'),
    ('{"prompt": "a"}', 'missing "completion"'),
    ('{"prompt": "a", "completion": null}', '"completion" must be a string'),
    ('{"prompt": "a", "completion": "  "}', 'empty "completion"'),
    ('{"prompt": "a", "completion": " b", "split": "test"}', 'unknown "split"'),
])
def test_load_jsonl_errors_name_the_line(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")  # the blank line 2 still counts
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        load_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_load_jsonl_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(path)


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{GOOD}\n\n{json.dumps({'prompt': '', 'completion': ' c', 'split': 'eval'})}\n")
    assert load_jsonl(path) == [{"prompt": "a", "completion": " b"},
                                {"prompt": "", "completion": " c", "split": "eval"}]


# -- split -----------------------------------------------------------------------------------------

def test_split_by_field_and_fallback():
    marked = [{"prompt": "p", "completion": " c", "split": s} for s in ("train", "eval", "train")] + [
        {"prompt": "q", "completion": " c"}]
    train, held = split(marked)
    assert train == [marked[0], marked[2], marked[3]] and held == [marked[1]]
    plain = [{"prompt": str(i), "completion": " c"} for i in range(25)]
    assert split(plain) == (plain[:23], plain[23:])
    assert split(plain[:3]) == (plain[:2], plain[2:3])  # at least one held out
    with pytest.raises(ValueError, match="no held-out"):
        split([{"prompt": "p", "completion": " c", "split": "train"}] * 3)
    with pytest.raises(ValueError, match="no training"):
        split(plain[:1])


# -- collator --------------------------------------------------------------------------------------

def test_collator_left_pads_and_masks_prompt():
    batch = PromptCompletionCollator(word_tokenizer())([
        {"prompt": "a b c", "completion": " d"},
        {"prompt": "e", "completion": " f g"},
    ])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    eos = 1
    assert batch["input_ids"].tolist() == [ids("a b c d") + [eos], [0] + ids("e f g") + [eos]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [0] + [1] * 4]
    assert batch["labels"].tolist() == [[-100] * 3 + ids("d") + [eos], [-100] * 2 + ids("f g") + [eos]]


def test_collator_pads_with_eos_without_pad_token():
    tok = word_tokenizer(pad=False)
    assert tok.pad_token_id is None
    batch = PromptCompletionCollator(tok)([{"prompt": "a", "completion": " b"}, {"prompt": "a b c", "completion": " d"}])
    assert batch["input_ids"][0, :2].tolist() == [1, 1] and batch["attention_mask"][0, :2].tolist() == [0, 0]
    assert batch["labels"][0].tolist() == [-100, -100, -100, ids("b")[0], 1]  # the real EOS is learned


def test_collator_without_eos_token():
    batch = PromptCompletionCollator(word_tokenizer(eos=False))([{"prompt": "a", "completion": " b c"}])
    assert batch["input_ids"].tolist() == [ids("a b c")]
    assert batch["labels"].tolist() == [[-100] + ids("b c")]


def test_collator_truncates_prompt_from_the_left():
    collate = PromptCompletionCollator(word_tokenizer(), max_length=5)
    batch = collate([{"prompt": "a b c d e", "completion": " f g"}])
    assert batch["input_ids"].tolist() == [ids("d e f g") + [1]]
    assert batch["labels"].tolist() == [[-100, -100] + ids("f g") + [1]]
    # completion + EOS exactly max_length: the prompt is dropped entirely
    assert collate([{"prompt": "a", "completion": " b c d e"}])["labels"].tolist() == [ids("b c d e") + [1]]


def test_collator_truncation_keeps_bos():
    tok = word_tokenizer(bos=True)
    batch = PromptCompletionCollator(tok, max_length=5)([{"prompt": "a b c d", "completion": " e f"}])
    assert batch["input_ids"].tolist() == [[3] + ids("d e f") + [1]]
    assert batch["labels"].tolist() == [[-100, -100] + ids("e f") + [1]]


def test_collator_rejects_too_long_completion():
    collate = PromptCompletionCollator(word_tokenizer(), max_length=4)
    examples = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d e f g"}]
    with pytest.raises(ValueError, match=r"example 1 .*'c'.*5 tokens.*max_length=4"):
        collate(examples)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def test_encode_prompts_left_pads_like_the_collator():
    tok = word_tokenizer(bos=True)
    input_ids, mask = encode_prompts(tok, ["a b c", "d"])
    assert input_ids.tolist() == [[3] + ids("a b c"), [0, 0, 3] + ids("d")]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    collated = PromptCompletionCollator(tok)([{"prompt": "a b c", "completion": " e"}])
    assert collated["input_ids"][0, :4].tolist() == input_ids[0].tolist()


def test_collator_check_names_the_example_up_front():
    collate = PromptCompletionCollator(word_tokenizer(), max_length=4)
    examples = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d e f g"}]
    collate.check(examples[:1], "training")  # fits: nothing raised
    with pytest.raises(ValueError, match=r"^training example 2 of 2 \(prompt 'c'.*5 tokens.*max_length=4"):
        collate.check(examples, "training")


def test_load_jsonl_names_a_non_utf8_line_and_accepts_a_bom(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b'\n{"prompt": "\xff", "completion": " b"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text")):
        load_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")
    assert load_jsonl(path) == [{"prompt": "a", "completion": " b"}]
