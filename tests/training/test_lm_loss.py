"""The LM loss without full logits: chunked over labelled tokens, equal to the full loss."""

import pytest
import torch

from medcare_dist.errors import ConfigError
from medcare_dist.training.lm_loss import ChunkedLinearCrossEntropy, LogitTransform, logit_transform, model_lm_loss_sum

from helpers import adapter_grads, assert_relative_close, assert_same_loss_and_gradients, stage1_model, write_family_model


@pytest.mark.parametrize("chunk_tokens", [7, 4096])
def test_chunked_loss_and_every_adapter_gradient_equal_the_full_logits_ones(tiny_model_dir, chunk_tokens):
    model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=False)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 21))
    labels = input_ids.clone()
    labels[:, :5] = -100
    labels[2, 12:] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 12:] = 0  # a padded row
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    results = []
    for impl in ("full", "chunked"):
        adapters.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # same dropout masks
        loss = model_lm_loss_sum(model, inputs, labels, impl=impl, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), adapter_grads(adapters)))
    assert_same_loss_and_gradients(results, adapters, loss_rtol=1e-6, grad_rtol=1e-5)


def test_chunked_cross_entropy_against_torch_on_random_tensors():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    targets = torch.randint(0, 300, (50,))
    want = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * 3, hidden)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8)
    (got_grad,) = torch.autograd.grad(got * 3, hidden)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert_relative_close(got_grad, want_grad, 1e-6, "grad")


def test_a_micro_batch_without_labels_gives_zero_loss_and_still_runs_backward(tiny_model_dir):
    model, adapters = stage1_model(tiny_model_dir, grad_checkpointing=False)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 2))
    loss = model_lm_loss_sum(model, {"input_ids": input_ids}, torch.full((1, 2), -100), impl="chunked")
    loss.backward()  # a zero-weight micro-batch must still go through backward (ZeRO-3 collectives)
    assert float(loss) == 0.0
    grads = adapter_grads(adapters)
    assert grads and all(float(g.abs().sum()) == 0.0 for g in grads.values())


def test_liger_is_refused_with_a_reason_where_it_cannot_run(tiny_model_dir):
    model, _ = stage1_model(tiny_model_dir, grad_checkpointing=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with pytest.raises(ValueError, match="liger"):
        model_lm_loss_sum(model, {"input_ids": ids}, ids, impl="liger")


@pytest.mark.parametrize("transform", [LogitTransform(scale=2.5), LogitTransform(cap=1.5), LogitTransform(0.5, 2.0)])
def test_chunked_cross_entropy_applies_the_logit_transform_with_its_exact_gradient(transform):
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    weight, bias = torch.randn(300, 16), torch.randn(300)  # a head with a bias (Phi-2's) too
    targets = torch.randint(0, 300, (50,))
    want = torch.nn.functional.cross_entropy(transform(hidden @ weight.T + bias), targets, reduction="sum")
    (want_grad,) = torch.autograd.grad(want * 3, hidden)
    got = ChunkedLinearCrossEntropy.apply(hidden, weight, targets, 8, transform, bias)
    (got_grad,) = torch.autograd.grad(got * 3, hidden)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    assert_relative_close(got_grad, want_grad, 1e-6, "grad")
    plain = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum")
    assert abs(float((plain - want).detach())) > 1.0  # the transform matters here


@pytest.mark.parametrize("family, field", [("gemma2", "final_logit_softcapping"), ("cohere", "logit_scale")])
def test_soft_capped_and_scaled_logits_chunked_loss_equals_the_models_own(tmp_path, family, field):
    """Gemma 2's soft-capping and Cohere's logit scale: the chunked loss and every adapter
    gradient equal those of the model's own logits; without the transform they would not."""
    model, adapters = stage1_model(write_family_model(tmp_path / family, family), grad_checkpointing=False)
    assert logit_transform(model.config).fields == (field,)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 17))
    labels = input_ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": input_ids}
    results = []
    for impl in ("full", "chunked"):
        adapters.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model_lm_loss_sum(model, inputs, labels, impl=impl, chunk_tokens=7)
        loss.backward()
        results.append((loss.detach(), adapter_grads(adapters)))
    assert_same_loss_and_gradients(results, adapters, loss_rtol=1e-6, grad_rtol=1e-5)
    setattr(model.config, field, None)
    torch.manual_seed(5)
    assert abs(float(model_lm_loss_sum(model, inputs, labels, chunk_tokens=7)) - float(results[0][0])) > 0.1


def test_liger_refuses_a_logit_transform_naming_the_field(tmp_path):
    model = write_family_model(tmp_path / "gemma2", "gemma2")
    from medcare_dist.artefacts.hf_model import model_skeleton
    from medcare_dist.training.lm_loss import check_lm_loss

    skeleton = model_skeleton(str(model))
    assert check_lm_loss(skeleton, "chunked") == LogitTransform(cap=0.3, fields=("final_logit_softcapping",))
    with pytest.raises(ConfigError, match="^lm_loss 'liger' does not apply the model config's final_logit_softcapping"):
        check_lm_loss(skeleton, "liger")


def test_a_model_that_changes_its_logits_in_an_unknown_way_is_refused(tmp_path):
    """The transforms known here pass the startup check; one it does not know (here: logits
    doubled by a hook, as a config field not read here would) is refused in one line."""
    from transformers import AutoModelForCausalLM

    from medcare_dist.training.lm_loss import check_logits_after_head

    for family in ("gemma2", "cohere", "qwen2"):
        check_logits_after_head(AutoModelForCausalLM.from_pretrained(write_family_model(tmp_path / family, family)), "cpu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2")
    model.register_forward_hook(lambda _module, _args, out: out.__class__(logits=out.logits * 2))
    with pytest.raises(ConfigError, match=r"^Qwen2ForCausalLM's logits are not its LM head's output: it changes them"):
        check_logits_after_head(model, "cpu")


def test_an_lm_head_with_a_bias_chunked_loss_equals_the_models_own():
    """Phi-2's LM head has a bias: the chunked loss adds it, as the model's own head does."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(std=1.0)
    input_ids = torch.randint(0, 128, (2, 15))
    labels = input_ids.clone()
    labels[:, :3] = -100
    full, chunked = (model_lm_loss_sum(model, {"input_ids": input_ids}, labels, impl=impl, chunk_tokens=5)
                     for impl in ("full", "chunked"))
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
