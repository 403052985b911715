"""Byte-level tokenizer of the embedded model: token = byte value, plus four special tokens."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; BOS, EOS and the chat role markers follow."""

    bos_id: int = 256
    eos_id: int = 257
    user_id: int = 258
    assistant_id: int = 259

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return 260

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Text -> token ids (BOS first when asked)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Token ids -> raw bytes (for incremental decoding of streams)."""
        return bytes(i for i in ids if 0 <= i < 256)

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A chat as tokens: BOS, then each message as its role marker and its content, then the assistant marker."""
        ids = [self.bos_id]
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"messages[{i}]: expected role system/user/assistant and a string "
                                 f"content, got role={role!r}, content type {type(content).__name__}")
            ids.append(self.assistant_id if role == "assistant" else self.user_id)
            ids.extend(content.encode("utf-8"))
        ids.append(self.assistant_id)
        return ids
