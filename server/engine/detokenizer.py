"""detokenizer: token ids -> text deltas that never end inside a character.

Byte-level BPE can split one Chinese character over several tokens; decoding such a prefix yields
U+FFFD. We hold text back until the decoded tail is whole (the prefix/read offset scheme of TGI).
A byte sequence the model got wrong (a stray continuation byte) can never become a character; its
U+FFFD is dropped rather than shown to the user.

For byte-level BPE tokenizers (ByteLevel decoder, as the demo's) each id stands for fixed bytes, so the hot
path is a table lookup and Python's incremental UTF-8 decoder (which holds an unfinished character and, with
errors="ignore", drops stray bytes the same way) instead of a tokenizer.decode per token: ~7.5 µs a token
measured here became the cost that bounded a 256-stream step. Other tokenizers take the decode path.
"""
from __future__ import annotations

import codecs
import weakref

_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_table(tokenizer) -> list[bytes] | None:
    """id -> the bytes it decodes to (b"" for special tokens), for a ByteLevel tokenizer; else None."""
    try:
        return _tables[tokenizer]
    except (KeyError, TypeError):
        pass
    table = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        added = {t.content: t for t in backend.get_added_tokens_decoder().values()}
        special = set(tokenizer.all_special_ids)
        table = []
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            if i in special or piece is None:
                table.append(b"")
            elif piece in added:                      # added tokens are stored as plain text
                table.append(b"" if added[piece].special else piece.encode("utf-8"))
            else:
                table.append(bytes(to_byte[c] for c in piece))
    try:
        _tables[tokenizer] = table
    except TypeError:
        pass
    return table


class ByteDetokenizer:
    """The table path: bytes per id through an incremental UTF-8 decoder."""

    def __init__(self, table: list[bytes]):
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.table[token_id]) if token_id < len(self.table) else ""


def make_detokenizer(tokenizer):
    table = byte_table(tokenizer)
    return ByteDetokenizer(table) if table is not None else IncrementalDetokenizer(tokenizer)


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0   # start of the window decoded for context
        self.read_offset = 0     # ids before this were already emitted
        self.prefix_text = ""    # decode of ids[prefix_offset:read_offset]; changes only when the offsets move

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (may be empty)."""
        self.ids.append(token_id)
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(self.prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(self.prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
            return delta.replace("\ufffd", "")
        return ""
