"""Benchmark files in the shapes their publishers distribute, each written here in that shape,
read into ExamRecords; records that do not fit are errors naming file, record and field."""

import csv
import json

import pytest

from medcare_dist.eval.exam_files import ExamRecord, detect_format, read_eval_file
from medcare_dist.errors import DataError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, rows, header=None):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


MEDQA = {"question": "A 23-year-old woman ... Which is the most likely diagnosis?",
         "answer": "Ectopic pregnancy", "options": {"A": "Appendicitis", "B": "Ectopic pregnancy", "C": "Ovarian torsion",
                                                    "D": "Pelvic inflammatory disease", "E": "Endometriosis"},
         "meta_info": "step2&3", "answer_idx": "B"}


def test_medqa_and_mmedbench(tmp_path):
    zh = {"question": "男，45岁。最可能的诊断是？", "options": {"A": "胃炎", "B": "胆囊炎", "C": "胰腺炎", "D": "阑尾炎", "E": "肠梗阻"},
          "answer_idx": "C", "answer": "胰腺炎", "meta_info": "卫生法规", "rationale": "...", "human_checked": 0}
    fmt, recs = read_eval_file(_jsonl(tmp_path / "medqa_test.jsonl", [MEDQA, zh]))
    assert fmt == "medqa"
    assert recs[0] == ExamRecord(0, MEDQA["question"], MEDQA["options"], ("B",), "step2&3", "en", False)
    assert (recs[1].answers, recs[1].lang, recs[1].subject, list(recs[1].options)) == (("C",), "zh", "卫生法规", list("ABCDE"))


def test_medmcqa_cop_base_is_detected_from_the_file(tmp_path):
    def row(cop, **kw):
        return {"id": "x", "question": "Drug of choice for absence seizures?", "opa": "Phenytoin", "opb": "Ethosuximide",
                "opc": "Carbamazepine", "opd": "Phenobarbital", "cop": cop, "choice_type": "single",
                "exp": None, "subject_name": "Pharmacology", "topic_name": None, **kw}

    # the original JSON release: 1..4
    _, one = read_eval_file(_jsonl(tmp_path / "dev.json.jsonl", [row(2), row(4)]))
    assert [r.answers for r in one] == [("B",), ("D",)] and one[0].subject == "Pharmacology"
    # the Hugging Face copy: 0..3
    _, zero = read_eval_file(_jsonl(tmp_path / "hf.jsonl", [row(1), row(0)]))
    assert [r.answers for r in zero] == [("B",), ("A",)]
    ambiguous = _jsonl(tmp_path / "amb.jsonl", [row(1), row(2)])
    with pytest.raises(DataError, match=r"amb.jsonl: field 'cop' never is 0 or 4.*--format medmcqa0 or medmcqa1"):
        read_eval_file(ambiguous)
    assert [r.answers for r in read_eval_file(ambiguous, "medmcqa1")[1]] == [("A",), ("B",)]
    assert [r.answers for r in read_eval_file(ambiguous, "medmcqa0")[1]] == [("B",), ("C",)]
    with pytest.raises(DataError, match=r"test.jsonl: record 1 \(line 2\): field 'cop': -1 is not an option number 0..3"):
        read_eval_file(_jsonl(tmp_path / "test.jsonl", [row(0), row(-1)]))


def test_cmb_exam_multiple_answers_and_padded_options(tmp_path):
    single = {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "口腔执业医师", "question": "下列哪项是？",
              "answer": "D", "question_type": "单项选择题", "option": {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": "戊"}}
    multi = {"exam_type": "护理考试", "exam_class": "护士", "exam_subject": "", "question": "下列哪些是？",
             "answer": "ACD", "question_type": "多项选择题", "option": {"A": "甲", "B": "乙", "C": "丙", "D": "丁", "E": ""}}
    multi_one = {**multi, "answer": "B"}  # a multiple-answer question whose gold set has one letter
    path = tmp_path / "CMB-Exam-val.json"
    path.write_text(json.dumps([single, multi, multi_one], ensure_ascii=False), encoding="utf-8")
    fmt, recs = read_eval_file(path)
    assert fmt == "cmb"
    assert (recs[0].answers, recs[0].multi, recs[0].subject) == (("D",), False, "口腔执业医师")
    assert (recs[1].answers, recs[1].answer, recs[1].multi, recs[1].subject) == (("A", "C", "D"), "ACD", True, "护理考试")
    assert list(recs[1].options) == list("ABCD")  # CMB's empty E is padding, not an option
    assert recs[2].multi and recs[2].answers == ("B",)
    path.write_text(json.dumps([single, {**multi, "answer": "AE"}], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"CMB-Exam-val.json: record 1: field 'answer': answer 'AE' is not among the option letters A, B, C, D"):
        read_eval_file(path)


def test_cmexam_csv(tmp_path):
    header = ["Question", "Options", "Answer", "Explanation", "Disease Group", "Clinical Department", "Medical Discipline",
              "Competency", "Difficulty level"]
    rows = [["慢性支气管炎最主要的病因是？", "A 过敏因素\nB 吸烟\nC 感染\nD 遗传\nE 气候", "B", "吸烟是...", "呼吸系统", "内科", "临床医学", "", "3"],
            ["属于β受体阻滞剂的是？", "A 美托洛尔\nB 硝苯地平\nC 普萘洛尔\nD 卡托普利\nE 氢氯噻嗪", "AC", "", "", "内科", "药学", "", "2"]]
    fmt, recs = read_eval_file(_csv(tmp_path / "test_with_annotations.csv", rows, header))
    assert fmt == "cmexam"
    assert recs[0].options == {"A": "过敏因素", "B": "吸烟", "C": "感染", "D": "遗传", "E": "气候"}
    assert (recs[0].answers, recs[0].subject, recs[1].answers, recs[1].multi) == (("B",), "临床医学", ("A", "C"), True)
    rows[1][1] = "A 美托洛尔\n硝苯地平"
    with pytest.raises(DataError, match=r"bad.csv: record 1 \(line \d+\): field 'Options': line '硝苯地平' is not 'LETTER text'"):
        read_eval_file(_csv(tmp_path / "bad.csv", rows, header))


def test_mmlu_cmmlu_ceval_csvs_take_the_subject_from_the_file_name(tmp_path):
    mmlu = _csv(tmp_path / "anatomy_test.csv", [["Which bone is the longest?", "Femur", "Tibia", "Humerus", "Radius", "A"],
                                                ["Which organ makes insulin?", "Liver", "Pancreas", "Spleen", "Kidney", "B"]])
    fmt, recs = read_eval_file(mmlu)  # no header: question, A, B, C, D, answer
    assert fmt == "columns" and [r.answers for r in recs] == [("A",), ("B",)] and recs[0].subject == "anatomy"
    cmmlu = _csv(tmp_path / "clinical_knowledge.csv", [["0", "胰岛素由哪个器官分泌？", "肝", "胰腺", "脾", "肾", "B"]],
                 ["", "Question", "A", "B", "C", "D", "Answer"])
    _, recs = read_eval_file(cmmlu)
    assert (recs[0].question, recs[0].answers, recs[0].subject, recs[0].lang) == ("胰岛素由哪个器官分泌？", ("B",), "clinical_knowledge", "zh")
    ceval = _csv(tmp_path / "physician_val.csv", [["0", "下列属于？", "甲", "乙", "丙", "丁", "C", "解析"]],
                 ["id", "question", "A", "B", "C", "D", "answer", "explanation"])
    _, recs = read_eval_file(ceval)
    assert (recs[0].answers, recs[0].subject, recs[0].options["D"]) == (("C",), "physician", "丁")
    with pytest.raises(DataError, match=r"short.csv: a CSV without a question/Question header must have 6 columns"):
        read_eval_file(_csv(tmp_path / "short.csv", [["q", "a", "b", "A"]]))
    with pytest.raises(DataError, match=r"ragged_test.csv: record 1 \(line 2\): 5 columns where the header has 6"):
        read_eval_file(_csv(tmp_path / "ragged_test.csv", [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "d"]]))
    with pytest.raises(DataError, match=r"empty_test.csv: record 0 \(line 1\): field 'question' is missing or not a non-empty string"):
        read_eval_file(_csv(tmp_path / "empty_test.csv", [["", "a", "b", "c", "d", "A"]]))


def test_our_own_format_json_and_detection(tmp_path):
    ours = {"question": "Which drug class does furosemide belong to?", "options": ["PPI", "Loop diuretic"], "answer": "b",
            "subject": "pharmacology"}
    path = tmp_path / "exam.json"
    path.write_text(json.dumps([ours]), encoding="utf-8")
    fmt, recs = read_eval_file(path)
    assert (fmt, recs[0].options, recs[0].answers) == ("medcare", {"A": "PPI", "B": "Loop diuretic"}, ("B",))
    assert read_eval_file(_jsonl(tmp_path / "conv.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])) == ("conversations", None)
    assert detect_format({"foo": 1}) is None
    with pytest.raises(DataError, match=r"odd.jsonl: record 0 fits no known benchmark format \(fields: \['foo'\]\); pass --format NAME"):
        read_eval_file(_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}]))
    # forcing a format whose fields are absent names the missing field
    with pytest.raises(DataError, match=r"exam.json: record 0: field 'answer_idx' is missing \(medqa format\)"):
        read_eval_file(path, "medqa")
    with pytest.raises(DataError, match=r"unknown format 'medqa2'"):
        read_eval_file(path, "medqa2")
