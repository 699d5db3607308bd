"""Training data for prefix tuning: JSONL loading (prompt/completion, source/target, text/label),
splitting, collation, and the packaged tasks (the demo's table-to-text task; a review sentiment
classification task, :mod:`prefix_kernels.data.review_task`)."""

from prefix_kernels.data.jsonl import PromptCompletionCollator, demo_task_path, encode_prompts, load_jsonl, split
from prefix_kernels.data.review_task import path as review_task_path
from prefix_kernels.data.tasks import ClassificationCollator, Seq2SeqCollator, label_names

__all__ = ["ClassificationCollator", "PromptCompletionCollator", "Seq2SeqCollator", "demo_task_path",
           "encode_prompts", "label_names", "load_jsonl", "review_task_path", "split"]
