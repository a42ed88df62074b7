"""entropy_core.logging.DetailedLogger: level filter, JSON lines, gzip, retention, stages, progress."""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from entropy_core.logging import DetailedLogger


def _records(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_levels_filter(tmp_path):
    with DetailedLogger(tmp_path, run_name="lv", level="standard") as log:
        for level in ("minimal", "standard", "detailed", "debug"):
            log.log(f"at_{level}", level=level)
        assert log.enabled("standard") and not log.enabled("detailed")
        with pytest.raises(ValueError, match="expected one of"):
            log.log("x", level="verbose")
    assert [r["event"] for r in _records(log.path)] == ["at_minimal", "at_standard"]


def test_json_lines_and_value_conversion(tmp_path):
    with DetailedLogger(tmp_path, run_name="my run/1", level="debug") as log:
        log.log("values", scalar=torch.tensor(0.5, dtype=torch.float64), small=torch.arange(3),
                big=torch.zeros(100, 7, dtype=torch.bfloat16), np_scalar=np.float32(1.5),
                np_int=np.int64(7), arr=np.ones((2, 2)), bad=float("nan"), path=Path("/x"),
                nested={"k": (torch.tensor(True), None)}, dtype=torch.float32)
    assert re.fullmatch(r"my_run_1-\d{6}-%d\.jsonl" % os.getpid(), log.path.name)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", log.path.parent.name) and log.path.parent.parent == tmp_path
    (rec,) = _records(log.path)
    assert rec["event"] == "values" and rec["level"] == "standard"
    assert rec["time"].endswith("+00:00")
    assert rec["fields"] == {
        "scalar": 0.5, "small": [0, 1, 2], "big": {"shape": [100, 7], "dtype": "bfloat16", "device": "cpu"},
        "np_scalar": 1.5, "np_int": 7, "arr": [[1.0, 1.0], [1.0, 1.0]], "bad": "nan", "path": "/x",
        "nested": {"k": [True, None]}, "dtype": "float32",
    }


def test_gzip(tmp_path):
    with DetailedLogger(tmp_path, run_name="gz", gzip=True) as log:
        for i in range(50):
            log.log("step", i=i)
    assert log.path.name.endswith(".jsonl.gz")
    assert [r["fields"]["i"] for r in _records(log.path)] == list(range(50))


def test_retention_keeps_max_files(tmp_path):
    old = []
    for i, day in enumerate(["2024-01-01", "2024-01-02", "2024-01-02", "2024-01-03", "2024-01-04"]):
        p = tmp_path / day / f"old{i}.jsonl"
        p.parent.mkdir(exist_ok=True)
        p.write_text("{}\n")
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
        old.append(p)
    (tmp_path / "notes.txt").write_text("not a log")
    log = DetailedLogger(tmp_path, run_name="new", max_files=3)
    log.close()
    logs = sorted(p for p in tmp_path.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz")))
    assert len(logs) == 3 and log.path in logs
    assert [p.exists() for p in old] == [False, False, False, True, True]
    assert not (tmp_path / "2024-01-01").exists() and not (tmp_path / "2024-01-02").exists()
    assert (tmp_path / "notes.txt").exists()


def test_stage_timing_and_error(tmp_path):
    with DetailedLogger(tmp_path, run_name="st") as log:
        with log.stage("sample", n=4) as t:
            time.sleep(0.05)
            assert t.elapsed_s > 0
        with pytest.raises(RuntimeError, match="boom"):
            with log.stage("update"):
                raise RuntimeError("boom")
    assert t.elapsed_s >= 0.05 and log.timings == {"sample": pytest.approx(t.elapsed_s)}
    recs = _records(log.path)
    assert [r["event"] for r in recs] == ["stage_start", "stage_end", "stage_start", "stage_error"]
    assert recs[0]["fields"] == {"stage": "sample", "n": 4}
    assert recs[1]["fields"]["elapsed_s"] == pytest.approx(t.elapsed_s)
    assert recs[3]["level"] == "minimal" and recs[3]["fields"]["error"] == "RuntimeError: boom"


def test_progress_every_tenth_and_end(tmp_path):
    with DetailedLogger(tmp_path, run_name="pr") as log:
        with log.progress("score E", total=100, every_seconds=1e9) as p:
            for _ in range(100):
                p.update()
    recs = _records(log.path)
    assert [r["fields"]["done"] for r in recs if r["event"] == "progress"] == list(range(10, 101, 10))
    assert recs[-1]["event"] == "progress_end" and recs[-1]["fields"]["total"] == 100


def test_mirror_to_std_logging_and_no_file(caplog):
    log = DetailedLogger(None, level="detailed")
    with caplog.at_level(logging.DEBUG, logger="entropy_core"):
        log.log("ess", eta=1e-4, ess=123.456)
        log.log("dbg", level="debug")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == \
        [("entropy_core", logging.INFO, "ess eta=0.0001 ess=123.5")]
    assert log.path is None


def test_thread_safe_writes_and_closed(tmp_path):
    log = DetailedLogger(tmp_path, run_name="th")

    def work(k):
        for i in range(200):
            log.log("w", k=k, i=i, payload="x" * 100)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    log.close()
    recs = _records(log.path)
    assert len(recs) == 800 and sorted((r["fields"]["k"], r["fields"]["i"]) for r in recs) == \
        [(k, i) for k in range(4) for i in range(200)]
    with pytest.raises(RuntimeError, match="closed"):
        log.log("late")
