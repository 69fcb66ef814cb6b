"""collate: batches for training — padded to the longest, or packed without padding.

Packed batches are one row of every example back to back, with position ids restarting at 0 for each example
(transformers' DataCollatorWithFlattening) and each example's start (`cu_seq_lens_q`). Under `attention: sdpa`
transformers builds a block-diagonal causal mask from the position ids, under `attention: varlen`
(trainer/attention.py) the kernel takes the starts; either way no example attends to another
(tests/test_train_fast.py checks the logits against each example alone). The label of each example's first token
is -100, so no loss crosses a boundary either. Padded batches pad on the right, which varlen attention relies on.
"""
from __future__ import annotations

from lawchat_server.prompt import IGNORE_INDEX


def make_collator(tokenizer, packing: bool):
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening
    if packing:
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                          return_flash_attn_kwargs=True)
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
