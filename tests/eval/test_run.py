"""`medcare-dist eval`: each method checked against hand computations on the tiny model
(loglik sentences, the forced letter, few-shot prompts, multiple-answer sets); an interrupted
eval resumed gives the uninterrupted report; 2 ranks give the 1-rank report; every artefact
kind and a PEFT adapter load and evaluate."""

import json
import math
import os
import random
import shutil
import sys

import pytest
import torch

from helpers import SAMPLE, free_port, run_launcher, write_stage1_checkpoint, write_stage2_checkpoint
from medcare_dist.eval import run as ev
from medcare_dist.errors import ConfigError
from medcare_dist.artefacts.loading import load_trained_model
from medcare_dist.eval.exam_files import ExamRecord, read_eval_file
from medcare_dist.data.dataset import build_dataset
from medcare_dist.eval.prompts import cloze_prompt, exam_messages, exam_prompt, fewshot_examples, parse_answer, parse_answer_letter
from medcare_dist.eval.scoring import FORCE_BIAS, forced_letters, greedy_generate, letter_token_ids
from medcare_dist.training.lm_loss import causal_lm_loss_sum

EN = ExamRecord(0, "Which drug class does furosemide belong to?",
                {"A": "Proton pump inhibitor", "B": "Loop diuretic", "C": "Antiplatelet agent"}, ("B",), "pharmacology")
ZH = ExamRecord(1, "哪一项最符合哮喘？", {"A": "喘息和夜间咳嗽", "B": "尿频", "C": "皮疹"}, ("A",), "internal_medicine", "zh")
MULTI = ExamRecord(2, "下列哪些是β受体阻滞剂？", {"A": "美托洛尔", "B": "硝苯地平", "C": "普萘洛尔"}, ("A", "C"), "pharmacology", "zh", True)


@pytest.fixture(autouse=True)
def _restore_environ():
    """run_eval in this process joins a world of one, which sets LOCAL_RANK: do not leak it
    into the launchers that later tests start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


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
    ("The answer is B, I think.", "B"),
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
    assert parse_answer_letter(text, "ABCD") == letter


@pytest.mark.parametrize("text, letters", [
    ("答案为ACD。", ("A", "C", "D")),
    ("答案为A、C", ("A", "C")),
    ("The answer is A and C.", ("A", "C")),
    ("The answer is C, A.", ("A", "C")),  # a set, in option order
    ("AC", ("A", "C")),
    ("答案为B。", ("B",)),
    ("The answer is B, I think.", ("B",)),  # "I" is not an option: the run stops there
    ("答案为AX", ("A",)),
    ("答案为", None),
])
def test_parse_multiple_answers(text, letters):
    assert parse_answer(text, "ABCDE", multi=True) == letters


# ---------------------------------------------------------------------- prompts


def test_prompt_is_the_chat_template_with_the_generation_prompt(tiny):
    _, tok, _ = tiny
    assert exam_prompt(tok, EN) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhich drug class does furosemide belong to?\n"
        "A. Proton pump inhibitor\nB. Loop diuretic\nC. Antiplatelet agent\n"
        'Answer with the letter of the correct option, in the form "The answer is X."<|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert exam_prompt(tok, ZH).endswith("C. 皮疹\n请选出正确答案，并以“答案为X。”的形式作答。<|im_end|>\n<|im_start|>assistant\n")
    assert exam_prompt(tok, MULTI).endswith("本题为多项选择题，请选出所有正确答案，并以“答案为XY。”的形式作答。<|im_end|>\n<|im_start|>assistant\n")


def test_fewshot_prompts_are_seeded_draws_that_exclude_the_record(tiny):
    _, tok, _ = tiny
    pool = [ExamRecord(i, f"Question {i}?", {"A": "yes", "B": "no"}, ("AB"[i % 2],)) for i in range(6)]
    shots = fewshot_examples(pool[3], pool, 2, seed=7, same_file=True)
    # by hand: the record itself removed, then random.Random("7:3").sample of 2
    expected = random.Random("7:3").sample([r for r in pool if r.index != 3], 2)
    assert shots == expected and pool[3] not in shots
    assert shots == fewshot_examples(pool[3], pool, 2, seed=7, same_file=True)  # the same on any rank / run
    assert [s.index for s in fewshot_examples(pool[3], pool, 5, seed=7, same_file=True)] != [3] and \
        pool[3] not in fewshot_examples(pool[3], pool, 5, seed=7, same_file=True)
    assert pool[3] in fewshot_examples(pool[3], pool, 6, seed=7, same_file=False)  # a dev pool is used whole
    with pytest.raises(ValueError, match="--num-fewshot 6 needs 6 examples but only 5"):
        fewshot_examples(pool[3], pool, 6, seed=7, same_file=True)
    a, b = shots
    assert exam_messages(pool[3], shots) == [
        {"role": "user", "content": f"{a.question}\nA. yes\nB. no\n" + 'Answer with the letter of the correct option, in the form "The answer is X."'},
        {"role": "assistant", "content": f"The answer is {a.answer}."},
        {"role": "user", "content": f"{b.question}\nA. yes\nB. no\n" + 'Answer with the letter of the correct option, in the form "The answer is X."'},
        {"role": "assistant", "content": f"The answer is {b.answer}."},
        {"role": "user", "content": "Question 3?\nA. yes\nB. no\n" + 'Answer with the letter of the correct option, in the form "The answer is X."'},
    ]
    assert exam_prompt(tok, pool[3], shots).count("<|im_start|>assistant\n") == 3


# ---------------------------------------------------------------------- hand-computed cases


def _full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double()


def _hand_loglik(model, tok, prompt: str, continuation: str) -> float:
    """sum_t log p(continuation token t | everything before it), one unpadded sequence."""
    p_ids, c_ids = _ids(tok, prompt), _ids(tok, continuation)
    logp = torch.log_softmax(_full_logits(model, p_ids + c_ids), dim=-1)
    return sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(c_ids))


def test_loglik_scores_equal_a_hand_computation(tiny):
    model, tok, _ = tiny
    records = [EN, ZH, MULTI]
    # batch_size 4: rows of several questions share a left-padded batch
    rows = ev.score_records(model, tok, records, [[]] * 3, ev.EvalSettings(batch_size=4, methods=("loglik", "cloze")))
    for record, row in zip(records, rows):
        prompt = exam_prompt(tok, record)
        sentence = "The answer is {}." if record.lang == "en" else "答案为{}。"
        sets = list(record.options) if not record.multi else ["A", "B", "C", "AB", "AC", "BC", "ABC"]
        expected = {s: _hand_loglik(model, tok, prompt, sentence.format(s)) for s in sets}
        got = row["loglik"]["scores"]
        assert list(got) == sets
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=2e-4), (key, got, expected)
        best = max(expected, key=expected.get)
        assert row["loglik"] == {"scores": got, "pred": best, "correct": best == record.answer}
        assert row["prompt"] == prompt and row["gold"] == record.answer
        # cloze: each option's text as the reply to the bare question, mean log-probability per token
        cloze = {x: _hand_loglik(model, tok, cloze_prompt(tok, record), text) / len(_ids(tok, text))
                 for x, text in record.options.items()}
        assert row["cloze"]["scores"] == pytest.approx(cloze, abs=2e-4)
        assert row["cloze"]["pred"] == max(cloze, key=cloze.get)
    assert cloze_prompt(tok, EN).endswith("<|im_start|>user\nWhich drug class does furosemide belong to?<|im_end|>\n<|im_start|>assistant\n")


def test_forced_letter_equals_a_hand_computation(tiny):
    """The reference step: argmax of the next-token logits + 100 on the option letters' tokens;
    a multiple-answer question repeats it while it picks new letters."""
    model, tok, _ = tiny
    cand_en = letter_token_ids(tok, "The answer is", "ABC")
    assert cand_en == {x: _ids(tok, "The answer is " + x)[-1] for x in "ABC"}
    cand_zh = letter_token_ids(tok, "答案为", "ABC")
    rows = [_ids(tok, exam_prompt(tok, EN) + "Loop diuretics act on the kidney.\nThe answer is"),
            _ids(tok, exam_prompt(tok, ZH) + "答案为"), _ids(tok, exam_prompt(tok, MULTI) + "答案为")]
    got = forced_letters(model, rows, [cand_en, cand_zh, cand_zh], [False, False, True], tok.pad_token_id, 2, "cpu")

    def hand(ids, cands, multi):
        chosen, ids = [], list(ids)
        while True:
            logits = _full_logits(model, ids)[-1].clone()
            for t in cands.values():
                logits[t] += FORCE_BIAS
            token = int(logits.argmax())
            letter = {t: x for x, t in cands.items()}[token]  # +100 makes it a letter
            if letter in chosen:
                break
            chosen.append(letter)
            ids.append(token)
            if not multi or len(chosen) == len(cands):
                break
        return tuple(x for x in cands if x in chosen)

    assert got == [hand(rows[0], cand_en, False), hand(rows[1], cand_zh, False), hand(rows[2], cand_zh, True)]
    assert all(len(g) == 1 for g in got[:2]) and len(got[2]) >= 1
    # without the bias the untrained model's next token is not a letter: the bias is what forces one
    assert int(_full_logits(model, rows[0])[-1].argmax()) not in cand_en.values()
    assert forced_letters(model, rows[:1], [cand_en], [False], tok.pad_token_id, 1, "cpu", bias=0.0) == [None]


def test_reference_and_generate_methods_score_sets_exactly(tiny, monkeypatch):
    """Multiple-answer questions are right only with exactly the gold set; the forced step
    runs on prompt + generation + answer prefix."""
    model, tok, _ = tiny
    replies = {0: "The answer is B.", 1: "I am not sure", 2: "答案为A。"}  # record 2's gold is AC
    monkeypatch.setattr(ev, "greedy_generate", lambda m, t, rows, *a: [_ids(tok, replies[k]) for k in range(len(rows))])
    seen = []
    real = ev.forced_letters
    monkeypatch.setattr(ev, "forced_letters", lambda m, rows, *a, **k: seen.extend(rows) or real(m, rows, *a, **k))
    rows = ev.score_records(model, tok, [EN, ZH, MULTI], [[]] * 3, ev.EvalSettings(methods=("generate", "reference")))
    assert [r["generate"] for r in rows] == [{"pred": "B", "correct": True}, {"pred": None, "correct": False},
                                            {"pred": "A", "correct": False}]
    assert seen[0] == _ids(tok, exam_prompt(tok, EN)) + _ids(tok, replies[0]) + _ids(tok, "\nThe answer is")
    assert seen[2] == _ids(tok, exam_prompt(tok, MULTI)) + _ids(tok, replies[2]) + _ids(tok, "\n答案为")
    for row, record in zip(rows, [EN, ZH, MULTI]):
        assert row["reference"]["correct"] == (row["reference"]["pred"] == record.answer)
    result = ev.exam_result  # the accuracy block counts what the rows say
    block = result("x.jsonl", "medcare", rows, ("generate", "reference"))
    assert block["generate"] == {"correct": 1, "accuracy": 1 / 3, "unparsed": 1}
    assert block["multiple_answer"] == 1 and set(block["subjects"]) == {"pharmacology", "internal_medicine"}


def test_conversation_loss_equals_a_hand_computation(tiny, small_data):
    model, tok, _ = tiny
    _, conv = small_data
    result = ev.evaluate_conversations(model, tok, conv, ev.EvalSettings(batch_size=5, max_length=256))
    dataset, _ = build_dataset([conv], tok, 256)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for record in dataset:  # one record at a time, no padding, the whole logits tensor
            ids = torch.tensor([record["input_ids"]])
            total += float(causal_lm_loss_sum(model(input_ids=ids).logits, torch.tensor([record["labels"]])))
            tokens += record["num_label_tokens"]
    assert result["records"] == 16 and result["label_tokens"] == tokens
    assert result["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_batched_greedy_generation_equals_one_at_a_time(tiny, small_data):
    model, tok, _ = tiny
    _, records = read_eval_file(small_data[0])
    rows = [_ids(tok, exam_prompt(tok, r)) for r in records[:6]]
    assert len({len(r) for r in rows}) > 1  # the batch really is left-padded
    batched = greedy_generate(model, tok, rows, 6, 8, "cpu")
    single = [greedy_generate(model, tok, [r], 1, 8, "cpu")[0] for r in rows]
    assert batched == single and all(batched)


# ---------------------------------------------------------------------- runs, resume, artefacts, ranks


def _strip(report):
    """A report without timings (what must match between runs)."""
    report = json.loads(json.dumps(report))
    report.pop("elapsed_s")
    for f in report["files"]:
        f.pop("elapsed_s")
    return report


def test_interrupted_eval_resumes_to_the_uninterrupted_report(tiny_model_dir, small_data, tmp_path, monkeypatch):
    exam, conv = small_data
    kw = dict(batch_size=3, max_new_tokens=4, max_length=256, dtype="fp32", num_fewshot=1)
    full = ev.run_eval(str(tiny_model_dir), [str(exam), str(conv)], records_dir=str(tmp_path / "full"), **kw)
    assert full["files"][0]["records"] == 12 and full["settings"]["num_fewshot"] == 1
    assert len((tmp_path / "full" / "00-exam.part0.jsonl").read_text().splitlines()) == 12
    row = json.loads((tmp_path / "full" / "00-exam.part0.jsonl").read_text().splitlines()[0])
    assert {"prompt", "gold", "generation", "loglik", "generate", "reference"} <= set(row)
    assert row["prompt"].count("<|im_start|>assistant") == 2  # one shot

    calls = []
    real = ev.score_records

    def dies_on_the_third_batch(model, tok, records, *a):
        calls.append([r.index for r in records])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(model, tok, records, *a)

    monkeypatch.setattr(ev, "score_records", dies_on_the_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        ev.run_eval(str(tiny_model_dir), [str(exam), str(conv)], records_dir=str(tmp_path / "cut"), **kw)
    part = tmp_path / "cut" / "00-exam.part0.jsonl"
    with part.open("a") as f:  # and a record half written when the process died
        f.write(json.dumps(row)[:40])
    calls.clear()
    resumed = ev.run_eval(str(tiny_model_dir), [str(exam), str(conv)], records_dir=str(tmp_path / "cut"), **kw)
    assert calls == [[6, 7, 8], [9, 10, 11]]  # only what was not done
    monkeypatch.setattr(ev, "score_records", real)
    assert _strip(resumed) == _strip(full)
    with pytest.raises(ValueError, match=r"holds records made with other settings \(num_fewshot differ\)"):
        ev.run_eval(str(tiny_model_dir), [str(exam), str(conv)], records_dir=str(tmp_path / "cut"), **{**kw, "num_fewshot": 0})
    limited = ev.run_eval(str(tiny_model_dir), [str(exam)], limit=5, methods=("loglik",), batch_size=3, dtype="fp32")
    assert limited["files"][0]["records"] == 5


def test_every_artefact_kind_and_a_peft_adapter_evaluate(tiny_model_dir, tmp_path, small_data):
    from medcare_dist.artefacts.manifest import artefact_kind
    from medcare_dist.artefacts.export import export_adapter, export_merged
    from medcare_dist.artefacts.stage2_base import prepare_stage2

    stage1 = write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1")
    base = prepare_stage2(stage1, tmp_path / "stage2-base")
    stage2 = write_stage2_checkpoint(base, tmp_path / "stage2")
    exam = tmp_path / "exam4.jsonl"
    exam.write_text("".join(small_data[0].read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8")
    kw = dict(batch_size=8, max_length=256, max_new_tokens=4, dtype="fp32")
    scores = {}
    for path, kind in ((tiny_model_dir, "hf"), (stage1, "stage1-checkpoint"), (base, "stage2-base"), (stage2, "stage2-checkpoint")):
        assert artefact_kind(path) == kind
        report = ev.run_eval(str(path), [str(exam), str(small_data[1])], **kw)
        exam_result, conv_result = report["files"]
        assert report["artefact"] == kind and exam_result["records"] == 4
        assert all(p["loglik"]["pred"] in "ABCD" and "generation" in p for p in exam_result["predictions"])
        assert math.isfinite(conv_result["loss"]) and conv_result["records"] == 16
        scores[kind] = (exam_result["predictions"][0]["loglik"]["scores"], conv_result["loss"])
    assert len({json.dumps(s) for s in scores.values()}) == 4  # each artefact's adapters change the numbers

    # the PEFT adapter of the stage-2 checkpoint, on its base, scores what the merged export scores
    export_adapter(stage2, tmp_path / "adapter", log=lambda *_: None)
    export_merged(stage2, tmp_path / "merged", dtype="fp32", log=lambda *_: None)
    with_adapter = ev.run_eval(None, [str(exam)], adapter=str(tmp_path / "adapter"), **kw)
    merged = ev.run_eval(str(tmp_path / "merged"), [str(exam)], **kw)
    assert with_adapter["artefact"] == "peft-adapter" and with_adapter["model"] == str(base)
    for a, b in zip(with_adapter["files"][0]["predictions"], merged["files"][0]["predictions"]):
        assert a["loglik"]["scores"] == pytest.approx(b["loglik"]["scores"], abs=1e-3)
    assert with_adapter["files"][0]["predictions"][0]["loglik"]["scores"] == pytest.approx(scores["stage2-checkpoint"][0], abs=1e-3)
    export_adapter(stage1, tmp_path / "adapter1", log=lambda *_: None)
    with pytest.raises(ValueError, match="stage-1 export: PEFT cannot load its mixture of LoRA experts"):
        ev.run_eval(None, [str(exam)], adapter=str(tmp_path / "adapter1"), **kw)


@pytest.mark.distributed
def test_two_rank_eval_equals_one_rank_and_resumes_across_world_sizes(tiny_model_dir, tmp_path, small_data):
    """1 rank evaluates everything; 2 ranks resume a copy of its records cut to 5 exam rows:
    the reports are the same, and each rank wrote a share of the 7 missing rows."""
    ckpt = write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1")
    exam, conv = small_data
    args = ["eval", "--model", str(ckpt), "--data", str(exam), str(conv), "--batch-size", "4",
            "--max-new-tokens", "8", "--max-length", "256", "--dtype", "fp32"]
    run_launcher([sys.executable, "-m", "medcare_dist", *args, "--out", str(tmp_path / "one.json"),
                  "--records", str(tmp_path / "rec1")], tmp_path / "one.log")
    shutil.copytree(tmp_path / "rec1", tmp_path / "rec2")
    part = tmp_path / "rec2" / "00-exam.part0.jsonl"
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:5]))
    run_launcher(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "medcare_dist", *args,
                  "--out", str(tmp_path / "two.json"), "--records", str(tmp_path / "rec2")], tmp_path / "two.log")
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two["artefact"] == one["artefact"] == "stage1-checkpoint" and two["format"] == ev.REPORT_FORMAT
    (exam2, conv2), (exam1, conv1) = two["files"], one["files"]
    for key in ("records", "loglik", "cloze", "generate", "reference", "subjects"):
        assert exam2[key] == exam1[key], key
    assert exam2["records"] == 12 and len(exam2["subjects"]) == 4
    for p2, p1 in zip(exam2["predictions"], exam1["predictions"]):
        assert (p2["index"], p2["loglik"]["pred"], p2["generation"], p2["reference"]) == \
               (p1["index"], p1["loglik"]["pred"], p1["generation"], p1["reference"])
        assert p2["loglik"]["scores"] == pytest.approx(p1["loglik"]["scores"], abs=1e-4)
    assert two["average"] == one["average"]
    new = [len((tmp_path / "rec2" / f"00-exam.part{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert new == [5 + 4, 3]  # rank 0 appended 4 of the 7 missing rows, rank 1 wrote 3
    assert (conv2["records"], conv2["label_tokens"]) == (conv1["records"], conv1["label_tokens"]) == (16, conv1["label_tokens"])
    assert conv2["loss"] == pytest.approx(conv1["loss"], rel=1e-6)
    log = (tmp_path / "two.log").read_text()
    assert log.count("average (1)") == 1 and "stage1-checkpoint" in log and "5 records already evaluated" in log


def test_eval_errors_before_any_work(tmp_path, tiny_model_dir):
    from medcare_dist.cli import main

    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(SAMPLE / "exam.jsonl")]) == 2
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", "--model", str(tiny_model_dir), "--num-fewshot", "60"]) == 2  # the sample exam has 60
    assert main(["eval", "--adapter", str(tmp_path)]) == 2  # no adapter_config.json
    wide = tmp_path / "cmb.json"  # a multiple-answer question with 9 options: 511 letter sets for loglik
    wide.write_text(json.dumps([{"question": "下列哪些是？", "option": {x: x * 2 for x in "ABCDEFGHI"}, "answer": "AB",
                                 "question_type": "多项选择题"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"cmb.json: record 0: a multiple-answer question with more than 8 options"):
        ev.run_eval(str(tiny_model_dir), [str(wide)])


def test_sample_exam_is_answerable_from_stage1_and_heldout_is_held_out():
    stage1 = " ".join(t["value"] for line in (SAMPLE / "stage1.jsonl").read_text(encoding="utf-8").splitlines()
                      for t in json.loads(line)["conversations"]).casefold()
    _, exam = read_eval_file(SAMPLE / "exam.jsonl")
    assert len(exam) == 60 and all(r.options[r.answer].casefold().rstrip(".") in stage1 for r in exam)
    training = set((SAMPLE / "stage2.jsonl").read_text(encoding="utf-8").splitlines())
    heldout = (SAMPLE / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    assert heldout and not training & set(heldout)
    assert read_eval_file(SAMPLE / "heldout.jsonl") == ("conversations", None)


def test_eval_table_puts_reports_side_by_side(tmp_path):
    from medcare_dist.cli import main

    def report(acc, loss):
        return {"settings": {"methods": ["loglik", "cloze"]},
                "files": [{"path": "data/exam.jsonl", "kind": "exam", "loglik": {"accuracy": acc}, "cloze": {"accuracy": acc / 2}},
                          {"path": "data/heldout.jsonl", "kind": "conversations", "loss": loss}]}

    (tmp_path / "a.json").write_text(json.dumps(report(0.25, 3.0)))
    (tmp_path / "b.json").write_text(json.dumps(report(0.5, 2.125)))
    from medcare_dist.eval.report import compare_table

    lines = compare_table([("base", report(0.25, 3.0)), ("final", report(0.5, 2.125))]).splitlines()
    assert lines[0].split() == ["model", "exam", "loglik", "exam", "cloze", "heldout", "loss"]
    assert lines[2].split() == ["base", "25.00", "12.50", "3.0000"] and lines[3].split() == ["final", "50.00", "25.00", "2.1250"]
    assert main(["eval-table", f"base={tmp_path / 'a.json'}", f"final={tmp_path / 'b.json'}"]) == 0
    assert main(["eval-table", str(tmp_path / "a.json")]) == 2  # not NAME=REPORT


@pytest.mark.parametrize("methods", [("generate",), ("loglik", "reference")])
def test_generating_methods_with_zero_new_tokens_are_an_error(tiny_model_dir, methods):
    with pytest.raises(ConfigError, match=rf"^--max-new-tokens 0 generates nothing for --methods {methods[-1]}: "):
        ev.run_eval(str(tiny_model_dir), methods=methods, max_new_tokens=0)


def test_a_checkpoint_is_evaluated_with_the_thinking_setting_it_was_trained_with(tiny_model_dir, tmp_path):
    ckpt = write_stage1_checkpoint(tiny_model_dir, tmp_path / "stage1", thinking=True)
    with pytest.raises(ConfigError, match=r"was trained with thinking: true; evaluate it with --thinking, as its prompts"):
        ev.run_eval(str(ckpt), methods=("loglik",))
