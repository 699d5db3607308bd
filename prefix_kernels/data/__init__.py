"""Prompt/completion data for prefix tuning: JSONL loading, splitting, collation, and the packaged
demo task."""

from prefix_kernels.data.jsonl import PromptCompletionCollator, demo_task_path, encode_prompts, load_jsonl, split

__all__ = ["PromptCompletionCollator", "demo_task_path", "encode_prompts", "load_jsonl", "split"]
