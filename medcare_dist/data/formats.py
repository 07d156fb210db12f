"""Record shapes: from one raw record to a validated list of ``{"role", "content"}`` messages.

    MedCare / ShareGPT  {"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...],
                         "system": str (optional, the record's system prompt)}
    OpenAI              {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                         "tools": [tool definition, ...] (optional)}
    Alpaca              {"instruction": str, "input": str (optional), "output": str,
                         "system": str (optional), "history": [[user, assistant], ...] (optional)}

Alpaca's prompt is the instruction, then a newline and the input when there is one (as
LLaMA-Factory renders it). OpenAI tool use is kept: an assistant turn's ``tool_calls`` (its
content may then be empty) and ``"role": "tool"`` results after it, rendered by the chat
template's own tool support with the record's ``tools`` (`chat`: the calls are trained, the
results masked; a template without tool support refuses the record). An empty ``system``
field is no system prompt (the template's default applies). Nothing in a record is dropped
silently. Text that spells a control token (``<|im_end|>``, ...) is refused when
`forbidden` lists it (it could forge turns).
"""

from __future__ import annotations

from typing import Any

from medcare_dist.data.chat import find_control_token
from medcare_dist.errors import DataError

# Per conversation key: the role key, the content key, role names.
SHAPES = {
    "conversations": ("from", "value", {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                                        "assistant": "assistant"}),
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
}
ALPACA_KEYS = ("instruction", "output")


def normalize_record(record: Any, forbidden: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Validate one raw record and return its messages as ``{"role", "content"}`` dicts.
    A message that spells one of the `forbidden` control tokens is an error.

    Raises DataError (without a location) naming the first problem found.
    """
    if not isinstance(record, dict):
        raise DataError(f"record is not an object (got {type(record).__name__})")
    present = [key for key in SHAPES if record.get(key) is not None]
    if not present and all(record.get(key) is not None for key in ALPACA_KEYS):
        return _checked(_alpaca_messages(record), forbidden)
    if not present:
        raise DataError("record has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI) nor "
                        "'instruction' and 'output' (Alpaca)")
    if len(present) > 1:
        raise DataError("record has both 'conversations' and 'messages'")
    key = present[0]
    role_key, content_key, role_names = SHAPES[key]
    turns = record[key]
    if not isinstance(turns, list):
        raise DataError(f"'{key}' is not a list (got {type(turns).__name__})")
    if not turns:
        raise DataError("empty conversation")
    messages = [_turn(turn, j, role_key, content_key, role_names) for j, turn in enumerate(turns)]
    system = _system(record)
    if system is not None:
        if messages[0]["role"] == "system":
            raise DataError("the record has both a 'system' field and a system turn")
        messages.insert(0, {"role": "system", "content": system})
    if record.get("tools") is not None:
        messages[0]["tools"] = _tools(record["tools"], key)
    return _checked(messages, forbidden, offset=1 if system is not None else 0)


def _system(record: dict) -> str | None:
    """The record's own system prompt; an empty one is none (the template's default applies),
    as ShareGPT and Alpaca exports write it."""
    system = record.get("system")
    return None if system is None or system == "" else _text(system, "'system'")


def _tools(tools: Any, key: str) -> list[dict]:
    """The record's tool definitions (OpenAI's `tools`), passed to the chat template with the
    conversation; they ride on its first message under "tools"."""
    if key != "messages":
        raise DataError("'tools' (tool definitions) belong to OpenAI 'messages' records, not to 'conversations'")
    if not isinstance(tools, list) or not tools or not all(isinstance(tool, dict) for tool in tools):
        raise DataError("'tools' is not a non-empty list of objects (tool definitions)")
    return tools


def _alpaca_messages(record: dict) -> list[dict[str, str]]:
    system = _system(record)
    messages = [{"role": "system", "content": system}] if system is not None else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"'history' is not a list (got {type(history).__name__})")
    for j, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(f"history item {j} is not a [user, assistant] pair")
        messages += [{"role": "user", "content": _text(pair[0], f"history item {j} user")},
                     {"role": "assistant", "content": _text(pair[1], f"history item {j} assistant")}]
    prompt = _text(record["instruction"], "'instruction'")
    extra = record.get("input")
    if extra:
        prompt += "\n" + _text(extra, "'input'")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(record["output"], "'output'")}]
    return messages


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} is not a string (got {type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON may spell half of a surrogate pair (a cut emoji); no tokenizer takes it
        raise DataError(f"{what} is not valid Unicode: a lone surrogate {value[err.start]!r} at character {err.start} "
                        "(an emoji cut in half?)") from None
    return value


def _turn(turn: Any, j: int, role_key: str, content_key: str, role_names: dict) -> dict:
    if not isinstance(turn, dict):
        raise DataError(f"turn {j} is not an object (got {type(turn).__name__})")
    role = turn.get(role_key)
    if content_key == "content" and (role == "tool" or turn.get("tool_calls") is not None):
        return _tool_turn(turn, j, role)
    if role not in role_names:
        raise DataError(f"turn {j}: unknown role {role!r} in '{role_key}' (expected one of {', '.join(role_names)})")
    message = {"role": role_names[role], "content": _text(turn.get(content_key), f"turn {j}: '{content_key}'")}
    reasoning = turn.get("reasoning_content")  # an assistant's reasoning (Qwen3's template renders it in <think>)
    if reasoning is not None:
        if message["role"] != "assistant" or not isinstance(reasoning, str) or not reasoning.strip():
            raise DataError(f"turn {j}: 'reasoning_content' must be non-empty text on an assistant turn")
        message["reasoning_content"] = reasoning
    return message


def _tool_turn(turn: dict, j: int, role: str) -> dict:
    """A tool result, or an assistant turn with tool calls (each an object; content optional)."""
    if role == "tool":  # with the call it answers and the tool's name where given (some templates render them)
        extra = {k: _text(turn[k], f"turn {j}: {k!r}") for k in ("tool_call_id", "name") if turn.get(k) is not None}
        return {"role": "tool", "content": _text(turn.get("content"), f"turn {j}: 'content'"), **extra}
    calls = turn["tool_calls"]
    if role != "assistant":
        raise DataError(f"turn {j}: a {role!r} turn has tool_calls (only assistant turns make tool calls)")
    if not isinstance(calls, list) or not calls or not all(isinstance(call, dict) for call in calls):
        raise DataError(f"turn {j}: 'tool_calls' is not a non-empty list of objects")
    content = turn.get("content")
    return {"role": "assistant", "content": "" if content is None else _text(content, f"turn {j}: 'content'"),
            "tool_calls": calls}


def _checked(messages: list[dict], forbidden: tuple[str, ...], offset: int = 0) -> list[dict]:
    """Messages that are non-empty, free of control-token text and in a trainable order;
    `offset`: turns added before the record's own (its `system` field), so that errors
    count the record's turns."""
    for j, message in enumerate(messages):
        turn = f"turn {j - offset}" if j >= offset else "'system'"
        if not message["content"].strip() and "tool_calls" not in message:
            raise DataError(f"{turn}: empty content")
        token = next(filter(None, (find_control_token(message.get(k, ""), forbidden) for k in ("content", "reasoning_content"))),
                     None)
        if token is not None:
            raise DataError(f"{turn}: the {message['role']} text contains the control token {token!r}, which would "
                            "act as one (a forged turn); remove it, or set control_tokens: as_text to keep it as plain text")
    _check_turn_order(messages, offset)
    return messages


def _check_turn_order(messages: list[dict], offset: int) -> None:
    roles = [m["role"] for m in messages]
    for j, role in enumerate(roles):
        turn = j - offset  # the record's own numbering
        if role == "system" and j > 0:
            raise DataError(f"turn {turn}: system turn is not the first turn")
        if role == "tool" and not (roles[j - 1] == "tool" or "tool_calls" in messages[j - 1]):
            raise DataError(f"turn {turn}: a tool result that follows no assistant turn with tool_calls")
        if j > 0 and role == roles[j - 1] != "tool":
            raise DataError(f"turns {turn - 1} and {turn}: two {role} turns in a row")
    dialogue = [role for role in roles if role != "system"]
    if "assistant" not in dialogue:
        raise DataError("no assistant turn")
    if dialogue[0] != "user":
        raise DataError("the first non-system turn is an assistant turn (expected a user turn)")
    if dialogue[-1] != "assistant":
        raise DataError("the last turn is a user turn (nothing after it would be trained)")
