"""`medcare-dist eval`: exam accuracy (log-likelihood and generated answers) and held-out LM
loss, checked against hand computations on the tiny model; 2 ranks give what 1 rank gives;
every artefact kind loads and evaluates."""

import json
import math
import sys

import pytest
import torch

from conftest import SAMPLE, run_launcher, write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist import evaluate as ev
from medcare_dist.loading import load_trained_model
from medcare_dist.data import DataError, build_dataset
from medcare_dist.losses import causal_lm_loss_sum

EN = {"question": "Which drug class does furosemide belong to?",
      "options": {"A": "Proton pump inhibitor", "B": "Loop diuretic", "C": "Antiplatelet agent"},
      "answer": "B", "subject": "pharmacology"}
ZH = {"question": "哪一项最符合哮喘？", "options": ["喘息和夜间咳嗽", "尿频", "皮疹"], "answer": "A", "subject": "internal_medicine"}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_trained_model(tiny_model_dir)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """12 exam questions (English and Chinese, four subjects) and 16 conversations."""
    root = tmp_path_factory.mktemp("eval-data")
    exam, conv = root / "exam.jsonl", root / "conv.jsonl"
    exam.write_text("".join((SAMPLE / "exam.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:12]), encoding="utf-8")
    conv.write_text("".join((SAMPLE / "stage2.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    return exam, conv


# ---------------------------------------------------------------------- letter parsing


@pytest.mark.parametrize("text, letter", [
    ("The answer is B.", "B"),
    ("the answer is **C**, because ...", "C"),
    ("Answer: (D)", "D"),
    ("I think option A is wrong; the answer is B.", "B"),  # an "answer" phrase wins over an "option" phrase
    ("The correct option is C", "C"),
    ("答案为B。", "B"),
    ("答案是：C", "C"),
    ("正确答案：（Ａ）", "A"),  # full-width letter and brackets
    ("根据症状，故选D。", "D"),
    ("B", "B"),
    ("(C)", "C"),
    ("B. Loop diuretic", "B"),
    ("C。", "C"),
    # bad generations: no option letter named
    ("A patient with these symptoms should rest.", None),  # "A" is an article here
    ("The answer is a fever", None),
    ("I don't know.", None),
    ("", None),
    ("The answer is E.", None),  # not one of the options
    ("答案为E", None),
    ("这个问题需要更多信息。", None),
    ("稳 empt病毒个�医嘱服用每日 fever", None),  # what the untrained tiny model writes
])
def test_parse_answer_letter(text, letter):
    assert ev.parse_answer_letter(text, "ABCD") == letter


def test_parse_respects_the_records_letters():
    assert ev.parse_answer_letter("The answer is D.", "ABC") is None
    assert ev.parse_answer_letter("The answer is E.", "ABCDE") == "E"


# ---------------------------------------------------------------------- records and prompts


def test_exam_records_are_validated_with_their_location(tmp_path):
    rec = ev.parse_exam_record(ZH, 0)
    assert rec.options == {"A": "喘息和夜间咳嗽", "B": "尿频", "C": "皮疹"} and rec.lang == "zh" and rec.answer == "A"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EN) + "\n" + json.dumps({**EN, "answer": "E"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: record 1 \(line 2\): answer 'E' is not one of the option letters A, B, C"):
        ev.read_eval_file(bad)
    assert ev.read_eval_file(SAMPLE / "stage2.jsonl") == ("conversations", None)


def test_prompt_is_the_chat_template_with_the_generation_prompt(tiny):
    _, tok, _ = tiny
    assert ev.exam_prompt(tok, ev.parse_exam_record(EN, 0)) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhich drug class does furosemide belong to?\n"
        "A. Proton pump inhibitor\nB. Loop diuretic\nC. Antiplatelet agent\n"
        'Answer with the letter of the correct option, in the form "The answer is X."<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert ev.exam_prompt(tok, ev.parse_exam_record(ZH, 0)).endswith("C. 皮疹\n请选出正确答案，并以“答案为X。”的形式作答。<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------- hand-computed cases


def _hand_loglik(model, tok, prompt: str, continuation: str) -> float:
    """sum_t log p(continuation token t | everything before it), one unpadded sequence."""
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(c_ids))


def test_loglik_scores_equal_a_hand_computation(tiny):
    model, tok, _ = tiny
    records = [ev.parse_exam_record(EN, 0), ev.parse_exam_record(ZH, 1)]
    # batch_size 4: rows of both questions share a left-padded batch (6 rows)
    scores = ev.score_options(model, tok, records, batch_size=4, device="cpu")
    for record, got in zip(records, scores):
        prompt = tok.apply_chat_template(ev.exam_messages(record), tokenize=False, add_generation_prompt=True)
        sentence = "The answer is {}." if record.lang == "en" else "答案为{}。"
        expected = {letter: _hand_loglik(model, tok, prompt, sentence.format(letter)) for letter in record.options}
        assert got.keys() == expected.keys()
        for letter in expected:
            assert got[letter] == pytest.approx(expected[letter], abs=2e-4), (letter, got, expected)
        assert ev.best_option(got) == max(expected, key=expected.get)
    assert ev.best_option({"A": -1.0, "B": -0.5, "C": -0.5}) == "B"  # a tie goes to the first in option order


def test_conversation_loss_equals_a_hand_computation(tiny, small_data):
    model, tok, _ = tiny
    _, conv = small_data
    result = ev.evaluate_conversations(model, tok, conv, ev.EvalSettings(batch_size=5, max_length=256))
    dataset, _ = build_dataset([conv], tok, 256)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for record in dataset:  # one record at a time, no padding
            ids = torch.tensor([record["input_ids"]])
            total += float(causal_lm_loss_sum(model(input_ids=ids).logits, torch.tensor([record["labels"]])))
            tokens += record["num_label_tokens"]
    assert result["records"] == 16 and result["label_tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_generated_answers_are_scored_and_unparsed_counted(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny
    exam = tmp_path / "exam.jsonl"
    rows = [EN, {**EN, "subject": "x"}, ZH, {**ZH, "answer": "B"}, {**EN, "subject": None}]
    exam.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    replies = ["The answer is B.", "The answer is A.", "答案为A。", "I am not sure", "答案是"]
    monkeypatch.setattr(ev, "generate_answers", lambda m, t, records, *a: [replies[r.index] for r in records])
    _, records = ev.read_eval_file(exam)
    result = ev.evaluate_exam(model, tok, exam, records, ev.EvalSettings())
    assert [p["generated_choice"] for p in result["predictions"]] == ["B", "A", "A", None, None]
    assert (result["records"], result["correct_generate"], result["unparsed"]) == (5, 2, 2)
    assert result["accuracy_generate"] == pytest.approx(0.4)
    zh = result["subjects"]["internal_medicine"]
    assert (zh["records"], zh["correct_generate"], zh["accuracy_generate"], zh["unparsed"]) == (2, 1, 0.5, 1)
    assert zh["correct_loglik"] == sum(p["loglik_choice"] == p["answer"] for p in result["predictions"][2:4])
    assert set(result["subjects"]) == {"pharmacology", "x", "internal_medicine"}  # record 4 has no subject


def test_batched_greedy_generation_equals_one_at_a_time(tiny, small_data):
    model, tok, _ = tiny
    _, records = ev.read_eval_file(small_data[0])
    batched = ev.generate_answers(model, tok, records[:6], 6, 8, "cpu")  # left-padded batch of 6
    single = [ev.generate_answers(model, tok, [r], 1, 8, "cpu")[0] for r in records[:6]]
    assert batched == single and all(batched)


# ---------------------------------------------------------------------- artefacts and ranks


def test_every_artefact_kind_evaluates(tiny_model_dir, tmp_path, small_data):
    from medcare_dist.artefacts import describe
    from medcare_dist.convert import prepare_stage2

    stage1 = write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1")
    base = prepare_stage2(stage1, tmp_path / "stage2-base")
    stage2 = write_stage2_checkpoint(base, tmp_path / "stage2")
    exam = tmp_path / "exam4.jsonl"
    exam.write_text("".join(small_data[0].read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    settings = ev.EvalSettings(batch_size=8, max_length=256, max_new_tokens=4)
    scores = {}
    for path, kind in ((tiny_model_dir, "hf"), (stage1, "stage1-checkpoint"), (base, "stage2-base"), (stage2, "stage2-checkpoint")):
        assert describe(path) == kind
        model, tok, _ = load_trained_model(path)
        exam_result, conv_result = ev.evaluate(model, tok, [exam, small_data[1]], settings, log=lambda *_: None)
        assert exam_result["records"] == 4 and len(exam_result["predictions"]) == 4
        assert all(p["loglik_choice"] in "ABCD" and "generated" in p for p in exam_result["predictions"])
        assert math.isfinite(conv_result["loss"]) and conv_result["records"] == 16
        scores[kind] = (exam_result["predictions"][0]["loglik_scores"], conv_result["loss"])
    assert len({json.dumps(s) for s in scores.values()}) == 4  # each artefact's adapters change the numbers


@pytest.mark.distributed
def test_two_rank_eval_equals_one_rank_on_a_stage1_checkpoint(tiny_model_dir, tmp_path, small_data):
    ckpt = write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1")
    exam, conv = small_data
    args = ["eval", "--model", str(ckpt), "--data", str(exam), str(conv), "--batch-size", "4",
            "--max-new-tokens", "8", "--max-length", "256"]
    run_launcher(["deepspeed", "--num_gpus", "2", "--master_port", "29741", "--module", "medcare_dist", *args,
                  "--out", str(tmp_path / "two.json")], tmp_path / "two.log")
    run_launcher([sys.executable, "-m", "medcare_dist", *args, "--out", str(tmp_path / "one.json")], tmp_path / "one.log")
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["artefact"] == one["artefact"] == "stage1-checkpoint" and two["format"] == ev.REPORT_FORMAT
    (exam2, conv2), (exam1, conv1) = two["files"], one["files"]
    for key in ("records", "accuracy_loglik", "accuracy_generate", "unparsed", "subjects"):
        assert exam2[key] == exam1[key], key
    assert exam2["records"] == 12 and len(exam2["subjects"]) == 4
    for p2, p1 in zip(exam2["predictions"], exam1["predictions"]):
        assert (p2["index"], p2["loglik_choice"], p2["generated"]) == (p1["index"], p1["loglik_choice"], p1["generated"])
        assert p2["loglik_scores"] == pytest.approx(p1["loglik_scores"], abs=1e-4)
    assert (conv2["records"], conv2["label_tokens"]) == (conv1["records"], conv1["label_tokens"]) == (16, conv1["label_tokens"])
    assert conv2["loss"] == pytest.approx(conv1["loss"], rel=1e-6)
    log = (tmp_path / "two.log").read_text()
    assert log.count("acc_loglik") == 1 and "stage1-checkpoint" in log  # the table is printed once, by rank 0


def test_eval_errors_before_any_work(tmp_path, tiny_model_dir):
    from medcare_dist.cli import main

    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(SAMPLE / "exam.jsonl")]) == 2
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
