"""The built-in default model: a tiny Qwen2 with a real, locally learned tokenizer.

Nothing here touches a model hub. The tokenizer is byte-level BPE learned on the
project's sample corpus, with the Qwen ChatML special tokens and chat template, so the
data pipeline and the training loop exercise exactly the code paths a real Qwen
checkpoint takes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Iterator

from medcare_dist.resources import SAMPLE_DIR

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen ChatML: a default system turn when the conversation has none; every turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZER_CORPUS = ("exam.jsonl", "stage1.jsonl", "stage2.jsonl")  # not heldout.jsonl: it is for evaluation

TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def _texts_from_files(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            turns = record.get("conversations") or record.get("messages") or []
            for turn in turns:
                yield str(turn.get("value", turn.get("content", "")))
            for key in ("question", "answer"):
                if key in record:
                    yield str(record[key])
            for option in (record.get("options") or {}).values():
                yield str(option)


def build_tokenizer(corpus_files: Iterable[Path] | None = None, vocab_size: int = 4000):
    """Learn a byte-level BPE tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = [SAMPLE_DIR / n for n in TOKENIZER_CORPUS] if corpus_files is None else list(corpus_files)
    texts = list(_texts_from_files(files)) + [DEFAULT_SYSTEM_PROMPT, "user", "assistant", "system"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=TINY_CONFIG["max_position_embeddings"],
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    return hf_tok


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        **TINY_CONFIG,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def pretrain(model, tokenizer, files: Iterable[Path], steps: int, seed: int = 0, lr: float = 3e-3,
             batch_size: int = 16, max_length: int = 256, log=print) -> list[float]:
    """A short full-parameter pretraining (every token of the rendered conversations, AdamW,
    cosine decay) so that the tiny model is a fluent base rather than random weights.
    Returns the loss of each step."""
    import random

    import torch

    from medcare_dist.data.batching import collate
    from medcare_dist.data.dataset import build_dataset

    dataset, _ = build_dataset(list(files), tokenizer, max_length)
    order = list(range(len(dataset)))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses, position = [], len(order)
    for step in range(steps):
        if position + batch_size > len(order):
            rng.shuffle(order)
            position = 0
        batch = collate([dataset[i] for i in order[position:position + batch_size]], tokenizer.pad_token_id)
        position += batch_size
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"pretrain step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def write_tiny_model(out_dir: str | Path, seed: int = 0, corpus_files: Iterable[Path] | None = None,
                     pretrain_steps: int = 0, pretrain_files: Iterable[Path] | None = None, log=print) -> Path:
    """Write the tiny model and its tokenizer to `out_dir` in Hugging Face format; with
    `pretrain_steps`, pretrained on `pretrain_files` (default: the sample stage-2 conversations)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus_files)
    model = build_tiny_model(tokenizer, seed=seed)
    if pretrain_steps > 0:
        pretrain(model, tokenizer, pretrain_files or [SAMPLE_DIR / "stage2.jsonl"], pretrain_steps, seed, log=log)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
