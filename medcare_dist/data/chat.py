"""From a conversation to token ids and labels that train exactly the assistant replies.

The tokenizer's chat template renders the whole conversation once. Each assistant turn is
then located in that rendering: `assistant_prompt` decides where a reply starts (the
rendering of the conversation before it with the generation prompt; eval's exam prompts are
the same function), and the reply plus end-of-turn text (with Qwen's ChatML, the reply,
``<|im_end|>`` and the newline) is what follows that prompt in the rendering through that
turn. Qwen3 renders the empty think block ``<think>\\n\\n</think>\\n\\n`` before the last
reply only, so rendering prefixes does not reproduce the whole rendering, yet each reply is
found: the last one after the block, which (thinking off, the default) belongs to the prompt
and is masked like the role words, so only what the assistant says, its end-of-turn token and
the newline after it are trained (the reference's rule); with thinking kept the block is
trained with the reply, and the prompt ends before it. A template that trims replies (Llama 3's
``| trim``) is followed: the trimmed reply is located and trained as the template renders it. A
template that renders a reply some other way is refused, naming the turn.

Text inside a message that spells one of the tokenizer's added tokens (``<|im_end|>``,
``<think>``, ...) is never turned into that token here: it is tokenised as plain text.
Whether such a record is accepted at all is `data.build_dataset`'s choice
(``control_tokens``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re

from medcare_dist.errors import ChatTemplateError, DataError

IGNORE_INDEX = -100
_LITERAL = "\ue000{}\ue001"  # stands for a piece of message text that must stay plain text
_LITERAL_RE = re.compile("\ue000(\\d+)\ue001")


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that cannot label conversations, naming the directory it came from."""
    where = tokenizer.name_or_path or "the tokenizer"
    if not set(tokenizer.get_vocab().values()) - set(tokenizer.added_tokens_decoder):
        raise ChatTemplateError(f"{where}: the tokenizer has no vocabulary (no tokenizer.json or vocab files there?)")
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"{where}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                                "or chat_template.jinja): cannot tell which tokens are assistant replies")


def pad_token_id(tokenizer) -> int:
    """The id that pads micro-batches: the tokenizer's pad token, else (as Qwen's base models
    and most causal LMs do) its end-of-sequence token. Padding is masked out of the loss."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ChatTemplateError(f"{tokenizer.name_or_path or 'the tokenizer'}: the tokenizer has neither a pad nor an "
                            "eos token; set \"pad_token\" in its tokenizer_config.json")


def control_token_strings(tokenizer) -> tuple[str, ...]:
    """The strings that the tokenizer turns into one of its added tokens (special or not), longest first."""
    return tuple(sorted({token.content for token in tokenizer.added_tokens_decoder.values()}, key=lambda s: (-len(s), s)))


def find_control_token(text: str, tokens: tuple[str, ...]) -> str | None:
    """The first control token spelled in `text`, or None."""
    found = _control_pattern(tokens).search(text) if tokens else None
    return found.group(0) if found else None


@functools.lru_cache(maxsize=8)
def _control_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, tokens)))


# ------------------------------------------------------------------------- rendering


def assistant_prompt(tokenizer, messages: list[dict], thinking: bool = False) -> str:
    """The conversation rendered up to the point where the assistant's next reply starts: the one
    place that decides it, for training labels (what follows it is trained) and for eval prompts
    (generation and scoring start there).

    The chat template's generation prompt, with thinking off unless `thinking`: Qwen3's ends
    with the empty think block ``<think>\\n\\n</think>\\n\\n``, exactly the text its template
    renders before a last reply, so a prompt plus the gold reply is the training rendering of
    the same conversation. With `thinking` the prompt ends at ``<|im_start|>assistant\\n`` and
    the think block the template renders before a last reply is trained as part of it, with the
    reply's ``reasoning_content`` when it has one (Qwen3 renders it there; other templates, and
    thinking off, refuse it). Templates without a thinking switch ignore `thinking`.
    """
    return _render(tokenizer, messages, add_generation_prompt=True, enable_thinking=thinking)


def render_with_spans(messages: list[dict], tokenizer, thinking: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation with the chat template; return the text and, for each assistant
    turn, the character span [start, end) of its reply and end-of-turn text in that text."""
    text = _render(tokenizer, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    reasoning = messages[turns[-1]].get("reasoning_content") if turns else None
    if reasoning and not thinking:
        raise ChatTemplateError(f"turn {turns[-1]}: its reasoning_content is trained only with thinking: true")
    spans = [_reply_span(tokenizer, messages, i, text, thinking) for i in turns]
    if reasoning and reasoning.strip() not in text[spans[-1][0]:spans[-1][1]]:
        raise ChatTemplateError(f"turn {turns[-1]}: the chat template does not render reasoning_content")
    return text, spans


def _reply_span(tokenizer, messages: list[dict], i: int, text: str, thinking: bool) -> tuple[int, int]:
    plain = _render(tokenizer, messages[:i], add_generation_prompt=True)
    prompt = assistant_prompt(tokenizer, messages[:i], thinking)
    through = _render(tokenizer, messages[: i + 1])
    if not (text.startswith(plain) and prompt.startswith(plain) and through.startswith(prompt)):
        raise ChatTemplateError(
            f"turn {i}: the chat template renders the conversation before this assistant turn (with the "
            "generation prompt) differently from how the turn starts in the whole conversation"
        )
    reply = through[len(prompt):]  # what follows the prompt when this turn is the last one
    content = messages[i]["content"]
    at = reply.find(content)
    if at < 0 and content.strip() != content:  # a template that trims replies (Llama 3's `| trim`): trained as rendered
        at = reply.find(content.strip())
    if at < 0:
        raise ChatTemplateError(f"turn {i}: the chat template does not render this assistant reply as given")
    rest = text[len(plain):]
    # as the last turn: after the prompt's own template text (Qwen3's empty think block); an
    # earlier turn that the template renders without that text: the reply from its content on
    for before, trained in ((prompt[len(plain):], reply), ("", reply[at:])):
        if rest.startswith(before + trained):
            start = len(plain) + len(before)
            return start, start + len(trained)
    raise ChatTemplateError(
        f"turn {i}: the chat template renders this assistant reply differently inside the whole conversation "
        "than as its last turn, so its tokens cannot be located"
    )


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, **options) -> str:
    """The chat template's text, with the conversation's tool definitions (on its first
    message, `formats`) given as the template's `tools`."""
    tools = messages[0].get("tools") if messages else None
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **options)


# ------------------------------------------------------------------------ tokenising


def tokenize_conversation(messages: list[dict], tokenizer, max_length: int, thinking: bool = False) -> dict:
    """Tokenise one conversation: input_ids, labels (-100 outside assistant replies),
    num_label_tokens (count of labels[1:] != -100), length, truncated, whitespace_adjusted
    (a reply the template rendered trimmed, trained as rendered).

    `thinking`: see `assistant_prompt`. Control-token text inside a message is tokenised as plain text: it is swapped for a
    placeholder before rendering and encoded on its own where the placeholder lands.
    """
    literals: list[str] = []
    pattern = _control_pattern(control_token_strings(tokenizer) + ("\ue000",))
    _check_tool_use(messages, tokenizer, pattern)

    def hide(match: re.Match) -> str:
        literals.append(match.group(0))
        return _LITERAL.format(len(literals) - 1)

    hidden = [{**message, **{key: pattern.sub(hide, message[key]) for key in ("content", "reasoning_content") if message.get(key)}}
              for message in messages]
    text, spans = render_with_spans(hidden, tokenizer, thinking)
    input_ids, starts = _encode(tokenizer, text, literals)
    labels = [token if any(begin <= start < end for begin, end in spans) else IGNORE_INDEX
              for token, start in zip(input_ids, starts)]
    replies = [m["content"] for m in hidden if m["role"] == "assistant"]
    return {
        "whitespace_adjusted": any(not text[begin:end].startswith(reply) for (begin, end), reply in zip(spans, replies)),
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "num_label_tokens": sum(label != IGNORE_INDEX for label in labels[1:max_length]),
        "length": min(len(input_ids), max_length),
        "truncated": len(input_ids) > max_length,
    }


def _check_tool_use(messages: list[dict], tokenizer, pattern: re.Pattern) -> None:
    """Tool calls and results need the template's own tool support; a call's arguments are
    rendered as the template writes them, so control-token text there is refused."""
    tool_turns = [j for j, m in enumerate(messages) if m["role"] == "tool" or "tool_calls" in m]
    tools = messages[0].get("tools") if messages else None
    if tools is not None and "tools" not in tokenizer.chat_template:
        raise DataError("the record has 'tools' (tool definitions), and the chat template has no tool support (it never "
                        "reads 'tools'); use a model whose template has it, or remove the field")
    if tool_turns and "tool_calls" not in tokenizer.chat_template:
        raise DataError(f"turn {tool_turns[0]}: tool calls or results, and the chat template has no tool support "
                        "(it never reads 'tool_calls'); use a model whose template has it, or remove the record")
    found = pattern.search(json.dumps(tools, ensure_ascii=False)) if tools is not None else None
    if found:
        raise DataError(f"'tools': a tool definition spells the control token {found.group(0)!r}, which would act as one")
    for j in tool_turns:
        found = pattern.search(json.dumps(messages[j].get("tool_calls", []), ensure_ascii=False))
        if found:
            raise DataError(f"turn {j}: a tool call spells the control token {found.group(0)!r}, which would act as one")


def _encode(tokenizer, text: str, literals: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character offset each starts at; every placeholder is
    encoded as its literal's plain text (its tokens start at the placeholder)."""
    ids, starts, pos = [], [], 0
    for match in [*_LITERAL_RE.finditer(text), None]:
        end = match.start() if match else len(text)
        if end > pos:
            encoding = tokenizer(text[pos:end], add_special_tokens=False, return_offsets_mapping=True)
            ids += encoding["input_ids"]
            starts += [pos + begin for begin, _ in encoding["offset_mapping"]]
        if match:
            plain = _plain_text_ids(tokenizer, literals[int(match.group(1))])
            ids += plain
            starts += [match.start()] * len(plain)
            pos = match.end()
    return ids, starts


def _plain_text_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` with no added token among them (added tokens that are not special are
    matched even with split_special_tokens, so such text is encoded in halves)."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(text) < 2 or not set(ids) & set(tokenizer.added_tokens_decoder):
        return ids
    half = len(text) // 2
    return _plain_text_ids(tokenizer, text[:half]) + _plain_text_ids(tokenizer, text[half:])


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the tokenizer's vocabulary, special tokens and chat template, and for a fast
    tokenizer its whole pipeline (merges, normalizer, pre-tokenizer): what decides the ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pipeline = json.loads(backend.to_str()) if backend is not None else None
    for call_state in ("truncation", "padding"):  # set per call by transformers, not part of the tokenizer
        (pipeline or {}).pop(call_state, None)
    identity = {
        "pipeline": pipeline,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": tokenizer.special_tokens_map,
        "added_tokens": sorted((i, t.content, t.special) for i, t in tokenizer.added_tokens_decoder.items()),
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
