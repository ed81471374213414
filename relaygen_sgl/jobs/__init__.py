"""Jobs over prompt files: batch runs with resumable JSONL output, and evaluation on the
bundled data sets."""

__all__: list[str] = []
