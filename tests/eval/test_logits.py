"""Eval's held-out loss and answer scores on models that change their logits after the LM
head (Gemma 2's soft-capping, Cohere's logit scale) equal what the model's own logits give."""

import pytest
import torch

from medcare_dist.eval.run import conversation_loss_sum
from medcare_dist.eval.scoring import continuation_logprobs
from medcare_dist.training.lm_loss import causal_lm_loss_sum

from helpers import write_family_model


@pytest.mark.parametrize("family, field", [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale")])
def test_eval_loss_and_loglik_equal_the_models_own_logits(tmp_path, family, field):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(write_family_model(tmp_path / family, family)).eval()
    torch.manual_seed(0)
    rows = [torch.randint(3, 128, (n,)).tolist() for n in (19, 12)]
    records = [{"input_ids": row, "labels": [-100] * 5 + row[5:]} for row in rows]
    with torch.no_grad():
        own = [model(input_ids=torch.tensor([row])).logits for row in rows]
    want = sum(float(causal_lm_loss_sum(logits, torch.tensor([r["labels"]]))) for logits, r in zip(own, records))
    total, tokens = conversation_loss_sum(model, records, [0, 1], pad_id=0, batch_size=2, device=torch.device("cpu"))
    assert tokens == 14 + 7 and total == pytest.approx(want, rel=1e-5)

    prompts, continuations = [row[:8] for row in rows], [row[8:] for row in rows]
    scores = continuation_logprobs(model, prompts, continuations, 0, 2, torch.device("cpu"))
    for score, logits, p, c in zip(scores, own, prompts, continuations):
        logprobs = torch.log_softmax(logits[0, len(p) - 1:-1].float(), dim=-1)
        assert score == pytest.approx(float(logprobs.gather(-1, torch.tensor(c)[:, None]).sum()), rel=1e-5)

    setattr(model.config, field, None)  # what eval gave before it applied the transform: far off
    assert abs(conversation_loss_sum(model, records, [0, 1], 0, 2, torch.device("cpu"))[0] - want) > 0.1
