"""detokenizer: token ids -> text deltas that never end inside a character.

Byte-level BPE can split one Chinese character over several tokens; decoding such a prefix yields
U+FFFD. We hold text back until the decoded tail is whole (the prefix/read offset scheme of TGI).
A byte sequence the model got wrong (a stray continuation byte) can never become a character; its
U+FFFD is dropped rather than shown to the user.
"""
from __future__ import annotations


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
