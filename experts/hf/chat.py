"""Turning chat messages into a prompt: the tokenizer's chat template, else a documented default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The default template for tokenizers without one (documented in docs/api.md):
#   "### System:\n{content}\n\n" / "### User:\n{content}\n\n" / "### Assistant:\n{content}\n\n"
# followed by "### Assistant:\n" to prompt the answer.
ROLE_HEADERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
DEFAULT_ASSISTANT_PREFIX = "### Assistant:\n"


def message_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, Mapping) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def render_default(messages: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for m in messages:
        header = ROLE_HEADERS.get(str(m.get("role")), str(m.get("role")).capitalize())
        out.append(f"### {header}:\n{message_text(m.get('content'))}\n\n")
    out.append(DEFAULT_ASSISTANT_PREFIX)
    return "".join(out)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        plain = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return render_default(messages)
