"""Exam prompts (zero- and few-shot) and reading the answer a generation names.

A question is one user turn: the question, one line per option ("A. text"), and an
instruction to answer in the form "The answer is X." (English) or "答案为X。" (Chinese: a
question with CJK characters); multiple-answer questions ask for all correct letters ("The
answer is AC."). K-shot prompts put K solved questions before it, each a user turn and an
assistant turn that is the answer sentence. The conversation is rendered up to the
assistant's reply exactly as training rendered it (`data.chat.assistant_prompt`: for Qwen3
with the empty think block unless thinking is kept), so a prompt plus a gold answer is the
training rendering of that conversation.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Sequence

from medcare_dist.data.chat import assistant_prompt
from medcare_dist.eval.exam_files import ExamRecord
from medcare_dist.errors import ConfigError

ANSWER_PREFIX = {"en": "The answer is", "zh": "答案为"}
INSTRUCTION = {
    ("en", False): 'Answer with the letter of the correct option, in the form "The answer is X."',
    ("zh", False): "请选出正确答案，并以“答案为X。”的形式作答。",
    ("en", True): 'This question may have several correct options. Answer with all their letters, '
                  'in the form "The answer is XY."',
    ("zh", True): "本题为多项选择题，请选出所有正确答案，并以“答案为XY。”的形式作答。",
}


def answer_sentence(letters: str, lang: str) -> str:
    """"The answer is B." / "答案为AC。"."""
    return f"{ANSWER_PREFIX['en']} {letters}." if lang == "en" else f"{ANSWER_PREFIX['zh']}{letters}。"


def question_turn(record: ExamRecord) -> str:
    lines = [record.question] + [f"{letter}. {text}" for letter, text in record.options.items()]
    lines.append(INSTRUCTION[(record.lang, record.multi)])
    return "\n".join(lines)


def exam_messages(record: ExamRecord, shots: Sequence[ExamRecord] = ()) -> list[dict]:
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": question_turn(shot)},
                     {"role": "assistant", "content": answer_sentence(shot.answer, shot.lang)}]
    return messages + [{"role": "user", "content": question_turn(record)}]


def exam_prompt(tokenizer, record: ExamRecord, shots: Sequence[ExamRecord] = (), thinking: bool = False) -> str:
    """The (few-shot) question rendered up to where the assistant answers (`assistant_prompt`)."""
    return assistant_prompt(tokenizer, exam_messages(record, shots), thinking)


def cloze_prompt(tokenizer, record: ExamRecord, shots: Sequence[ExamRecord] = (), thinking: bool = False) -> str:
    """The question alone (no options, no instruction) as the user turn, for the cloze method,
    whose continuations are the option texts; shots answer with their gold option's text."""
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": shot.question},
                     {"role": "assistant", "content": "\n".join(shot.options[x] for x in shot.answers)}]
    messages.append({"role": "user", "content": record.question})
    return assistant_prompt(tokenizer, messages, thinking)


def fewshot_examples(record: ExamRecord, pool: Sequence[ExamRecord], k: int, seed: int,
                     same_file: bool) -> list[ExamRecord]:
    """K examples for `record`, drawn without replacement from `pool` (a dev file, or the
    record's own file minus the record when `same_file`) by a generator seeded with
    (seed, record index): the same shots on any rank, in any run."""
    if k <= 0:
        return []
    candidates = [r for r in pool if not (same_file and r.index == record.index)]
    if len(candidates) < k:
        raise ConfigError(f"--num-fewshot {k} needs {k} examples but only {len(candidates)} are available")
    return random.Random(f"{seed}:{record.index}").sample(candidates, k)


# ------------------------------------------------------------------------------ parsing

_OPEN = r"[\s*(\[（【\"'“]*"  # what may stand between a phrase and its letter: spaces, **, (, [, quotes
_SEP = r"\s*(?:,|，|、|;|；|and|&|和|及|与)?\s*"
# A run of letters: "B", "AC", "A, C", "A and C", "A、C". The first letter may be lower case so
# that "the answer is a fever" matches and is then rejected (only capitals name options).
_RUN = r"([A-Za-z](?:" + _SEP + r"[A-Z](?![a-z]))*)(?![A-Za-z])"
# Phrases naming the answer, by priority: an "answer" phrase wins over an "option" phrase.
_PHRASES = [
    # "The answer is B", "Answer: (B)", "answer is **B**"; "答案为B", "答案是：B", "正确答案：（B）"
    re.compile(r"answer\s*(?:is|:|=)?\s*" + _OPEN + _RUN, re.IGNORECASE),
    re.compile(r"答案\s*(?:为|是|应为|应该是|应选|选)?\s*[:：]?" + _OPEN + _RUN),
    # "The correct option is C", "choice: C"; "故选C", "应选择B", "选项B"
    re.compile(r"(?:option|choice)s?\s*(?:is|are|:)\s*" + _OPEN + _RUN, re.IGNORECASE),
    re.compile(r"(?:选项|选择|选)\s*(?:为|是)?\s*[:：]?" + _OPEN + _RUN),
]
# A reply that starts with its letter(s): "B", "(B)", "B.", "B. Loop diuretic", "B)", "B。", "AC".
_LONE = re.compile(r"^" + _OPEN + r"([A-Z](?:\s*[,，、]?\s*[A-Z])*)[\s*)\]）】\"'”]*(?:[.。:：,，)）、]|$)")


def _letters_of(run: str, valid: set[str], multi: bool) -> tuple[str, ...] | None:
    if not run[0].isupper() or run[0] not in valid:
        return None
    if not multi:
        return (run[0],)
    letters: list[str] = []
    for ch in re.findall(r"[A-Z]", run):
        if ch not in valid:
            break
        if ch not in letters:
            letters.append(ch)
    return tuple(letters)


def parse_answer(text: str, letters: Sequence[str] = "ABCD", multi: bool = False) -> tuple[str, ...] | None:
    """The option letter(s) a generated answer names, in option order, or None.

    In order of priority: the first "answer is X" / "answer: X" phrase (English, any case of
    "answer"), then "答案为X" / "答案是X" / "答案：X" (Chinese), then "option is X" / "choice: X",
    then "选X" / "选项X" / "选择X"; else a reply that starts with its letter ("B", "(B)", "B.",
    "B. Loop diuretic", "B。"). Only capital letters among `letters` count ("the answer is a
    fever" names none); full-width letters and punctuation are normalised first. A single-answer
    question takes the first letter after the phrase; a multiple-answer one the run of letters
    there ("AC", "A, C", "A and C", "A、C"), up to the first letter that is not an option.
    """
    text = unicodedata.normalize("NFKC", text or "")
    valid = {letter.upper() for letter in letters}
    found = None
    for pattern in _PHRASES:
        for match in pattern.finditer(text):
            found = _letters_of(match.group(1), valid, multi)
            if found:
                break
        if found:
            break
    if not found:
        match = _LONE.match(text.strip())
        found = _letters_of(match.group(1), valid, multi) if match else None
    return tuple(x for x in letters if x in found) if found else None


def parse_answer_letter(text: str, letters: Sequence[str] = "ABCD") -> str | None:
    """The single option letter a generated answer names, or None (see `parse_answer`)."""
    found = parse_answer(text, letters)
    return found[0] if found else None
