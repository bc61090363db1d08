"""Byte-level tokenizer of the default model: ids 0-255 are the UTF-8 bytes, then BOS, EOS and PAD.

``generate`` accepts any tokenizer with ``encode(text) -> list[int]`` and ``decode(ids) -> str``.
"""

from __future__ import annotations

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


class ByteTokenizer:
    bos_id, eos_id, pad_id, vocab_size = BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([BOS_ID] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
