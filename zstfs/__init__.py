"""zstfs: plain .jsonl on top, zstd-compressed cold files underneath."""

__version__ = "0.1.0"
