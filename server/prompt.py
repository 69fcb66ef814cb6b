"""prompt: the one place messages become token ids — for train, eval and serve alike.

The model dir's own chat template renders the turns and the assistant marker; `encode_prompt` is what the
server and eval feed the model, and `encode_training_example` appends the reply + EOS to that same prompt,
so what the model learns to continue is exactly what it is later asked to continue.
"""
from __future__ import annotations

IGNORE_INDEX = -100


class PromptError(ValueError):
    """The messages cannot be rendered (no template, or the template refuses them)."""


def check_template(tokenizer, where: str) -> None:
    if tokenizer.chat_template is None:
        raise PromptError(f"{where}: the tokenizer has no chat template")


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """messages ({role, content}, last one the user's) -> ids up to and including the assistant marker."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:   # e.g. a real model's template that requires alternating roles
        raise PromptError(f"the model's chat template rejected the messages: {type(e).__name__}: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)


def encode_training_example(tokenizer, conv: list[dict], max_input_length: int,
                            max_output_length: int) -> tuple[dict, bool, bool]:
    """-> ({input_ids, labels}, prompt_truncated, reply_truncated). Loss on the final reply + EOS only."""
    prompt_ids = encode_prompt(tokenizer, conv[:-1])
    reply_ids = tokenizer.encode(conv[-1]["content"], add_special_tokens=False)
    prompt_truncated = len(prompt_ids) > max_input_length
    if prompt_truncated:  # keep the end: it holds the question's tail and the assistant marker
        prompt_ids = prompt_ids[-max_input_length:]
    reply_truncated = len(reply_ids) + 1 > max_output_length
    reply_ids = reply_ids[:max_output_length - 1] + [tokenizer.eos_token_id]
    return ({"input_ids": prompt_ids + reply_ids,
             "labels": [IGNORE_INDEX] * len(prompt_ids) + reply_ids},
            prompt_truncated, reply_truncated)


def article_line(heading: str, text: str) -> str:
    """One article as a prompt shows it (text may be cut, marked "……")."""
    return f"{heading}：{text}"


def context_block(lines: list[str]) -> str:
    """The statute block put before a question: the header, then one article_line each."""
    return CONTEXT_HEADER + "\n".join(lines)


def with_context(messages: list[dict], articles: list[tuple[str, str]], tokenizer, max_tokens: int) -> list[dict]:
    """The conversation with statute articles ((heading, text) pairs, best first) put before the last user turn's
    question, as many as fit in `max_tokens` tokens of the block (the last one cut to fit). The same wording is
    used when training with context and when serving."""
    def size(lines: list[str]) -> int:
        return len(tokenizer.encode(context_block(lines), add_special_tokens=False))

    lines: list[str] = []
    for heading, text in articles if max_tokens > 0 else ():
        line = article_line(heading, text)
        if size(lines + [line]) <= max_tokens:
            lines.append(line)
            continue
        ids = tokenizer.encode(line, add_special_tokens=False)
        lo, hi = 0, len(ids)                 # the longest head of this article that still fits, marked "……"
        while lo < hi:
            mid = (lo + hi + 1) // 2
            cut = tokenizer.decode(ids[:mid], skip_special_tokens=True).rstrip("\ufffd") + "……"
            lo, hi = (mid, hi) if size(lines + [cut]) <= max_tokens else (lo, mid - 1)
        if lo > 16:                          # a useful part of the article
            lines.append(tokenizer.decode(ids[:lo], skip_special_tokens=True).rstrip("\ufffd") + "……")
        break
    if not lines:
        return messages
    last = messages[-1]
    block = context_block(lines)
    return messages[:-1] + [{"role": last["role"], "content": f"{block}\n\n问题：{last['content']}"}]


def without_articles(messages: list[dict]) -> list[dict]:
    """The conversation when retrieval found no article it trusts: the last user turn says so (NO_ARTICLE), so the
    model answers without citing one as governing."""
    last = messages[-1]
    return messages[:-1] + [{"role": last["role"], "content": f"{NO_ARTICLE}\n\n问题：{last['content']}"}]


CONTEXT_HEADER = "参考法条：\n"
NO_ARTICLE = "参考法条：未找到可以确定适用于此问题的法条。"
