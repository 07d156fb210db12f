"""The model side of exam scoring: answer-sentence log-likelihoods, batched greedy generation
and the reference protocol's forced letter, all on left-padded batches.

Logits are computed only where they are needed: the decoder's hidden states are gathered at
the positions that predict a scored token and only those rows go through the LM head, so no
[batch, tokens, vocab] tensor is built (at a 152k vocabulary that tensor, not the model, is
what fills memory). The model's logit transform (soft-capping, logit scale: training.lm_loss)
is applied to those rows as the model's own forward would.
"""

from __future__ import annotations

from typing import Sequence

import torch

from medcare_dist.data.chat import pad_token_id
from medcare_dist.errors import ConfigError
from medcare_dist.training.lm_loss import logit_transform

FORCE_BIAS = 100.0  # added to the option letters' logits in the forced step, as the reference does


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded rows (positions start at 0
    at each row's first real token, so padding does not shift the rotary positions)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.as_tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


@torch.no_grad()
def logits_at(model, rows: list[list[int]], wanted: list[list[int]], pad_id: int, device) -> list[torch.Tensor]:
    """For each row, the fp32 logits [len(wanted[i]), vocab] at its positions `wanted[i]`
    (indices into the unpadded row), from one left-padded forward of all rows."""
    ids, mask, positions = left_pad(rows, pad_id, device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    width = ids.shape[1]
    row_idx = torch.tensor([i for i, w in enumerate(wanted) for _ in w], dtype=torch.long, device=hidden.device)
    col_idx = torch.tensor([width - len(rows[i]) + p for i, w in enumerate(wanted) for p in w],
                           dtype=torch.long, device=hidden.device)
    logits = logit_transform(model.config)(model.get_output_embeddings()(hidden[row_idx, col_idx]).float())
    return list(logits.split([len(w) for w in wanted]))


def continuation_logprobs(model, prompts: list[list[int]], continuations: list[list[int]], pad_id: int,
                          batch_size: int, device) -> list[float]:
    """sum_t log p(continuation_t | prompt, continuation_<t) for each (prompt, continuation) pair."""
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        p_batch, c_batch = prompts[start:start + batch_size], continuations[start:start + batch_size]
        rows = [p + c for p, c in zip(p_batch, c_batch)]
        # token at position q is predicted by the logits at q - 1
        wanted = [list(range(len(p) - 1, len(p) + len(c) - 1)) for p, c in zip(p_batch, c_batch)]
        for logits, cont in zip(logits_at(model, rows, wanted, pad_id, device), c_batch):
            target = torch.as_tensor(cont, device=logits.device)
            scores.append(float(torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum()))
    return scores


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_generate(model, tokenizer, rows: list[list[int]], batch_size: int, max_new_tokens: int,
                    device) -> list[list[int]]:
    """Greedy continuations of each prompt (no sampling, no repetition penalty, whatever the
    model's generation_config says), left-padded batches, cut before the first stop token."""
    from transformers import GenerationConfig

    pad_id, stops = pad_token_id(tokenizer), stop_token_ids(tokenizer)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
                              eos_token_id=stops, pad_token_id=pad_id, use_cache=True)
    # Our own copy of the model: drop its generation defaults (sampling, top_p, penalties) so
    # that nothing but `config` applies.
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad_id)
    out_rows: list[list[int]] = []
    for start in range(0, len(rows), batch_size):
        ids, mask, _ = left_pad(rows[start:start + batch_size], pad_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out_rows.append(row[:cut])
    return out_rows


def letter_token_ids(tokenizer, prefix: str, letters: Sequence[str]) -> dict[str, int]:
    """{letter: the token that writes it right after `prefix`} ("The answer is" -> " B";
    "答案为" -> "B"): the forced step chooses among these."""
    sep = " " if prefix[-1:].isascii() and prefix[-1:].isalpha() else ""
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    out: dict[str, int] = {}
    for letter in letters:
        full = tokenizer(prefix + sep + letter, add_special_tokens=False)["input_ids"]
        if full[:len(base)] == base and len(full) == len(base) + 1:
            out[letter] = full[-1]
        else:  # the letter merged with the prefix's last token: fall back to the bare letter
            alone = tokenizer(letter, add_special_tokens=False)["input_ids"]
            if len(alone) != 1:
                raise ConfigError(f"the tokenizer writes option letter {letter!r} with {len(alone)} tokens")
            out[letter] = alone[0]
    if len(set(out.values())) != len(out):
        raise ConfigError(f"option letters {', '.join(letters)} share tokens after {prefix!r}")
    return out


def forced_letters(model, rows: list[list[int]], candidates: list[dict[str, int]], multi: list[bool],
                   pad_id: int, batch_size: int, device, bias: float = FORCE_BIAS) -> list[tuple[str, ...] | None]:
    """The reference's forced step on each row (its prompt + generation + answer prefix):
    the next token is argmax(logits + bias on the option letters' tokens). A multiple-answer
    row repeats the step, each chosen letter appended, while it chooses a letter not chosen
    yet (at most one step per option). None when the argmax is not a letter (it can only be
    when some other logit exceeds every letter's by more than `bias`)."""
    results: list[tuple[str, ...] | None] = []
    for start in range(0, len(rows), batch_size):
        active = {i: list(rows[i]) for i in range(start, min(start + batch_size, len(rows)))}
        chosen: dict[int, list[str]] = {i: [] for i in active}
        while active:
            order = list(active)
            last = logits_at(model, [active[i] for i in order], [[len(active[i]) - 1] for i in order], pad_id, device)
            for i, logits in zip(order, last):
                by_token = {t: letter for letter, t in candidates[i].items()}
                biased = logits[0].clone()
                biased[list(by_token)] += bias
                token = int(biased.argmax())
                letter = by_token.get(token)
                if letter is not None and letter not in chosen[i]:
                    chosen[i].append(letter)
                    active[i].append(token)
                    if multi[i] and len(chosen[i]) < len(candidates[i]):
                        continue
                del active[i]
        results += [tuple(x for x in candidates[i] if x in chosen[i]) or None for i in sorted(chosen)]
    return results
