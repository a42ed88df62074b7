"""Structured run log: one JSON record per line, mirrored as one readable line to `logging`.

    log = DetailedLogger("runs/demo/logs", run_name="demo", level="detailed")
    with log.stage("sample_E") as t:          # logs stage_start / stage_end with elapsed_s
        ...
    log.log("ess", level="standard", eta=1e-4, ess=t_ess)   # tensors/numpy scalars become numbers
    log.close()

Levels, least to most verbose: minimal < standard < detailed < debug. A record is written when its
level is at or below the logger's level. Each record is
    {"time": ISO-8601 UTC, "level": ..., "event": ..., "fields": {...}}
Values: tensors and arrays with at most `max_inline` elements are written in full (0-d as a number);
larger ones as {"shape", "dtype", "device"} only, so logging never copies a big tensor. NaN/inf are
written as the strings "nan"/"inf"/"-inf" (a log must record a bad number, not fail on it).

Files: `<log_dir>/<YYYY-MM-DD>/<run_name>-<HHMMSS>-<pid>.jsonl` (UTC date and time of construction),
or `.jsonl.gz` with gzip=True (readable in full only after close()). At construction the oldest
`.jsonl`/`.jsonl.gz` files under log_dir are deleted so that at most `max_files` remain, the new one
included (a log still being written by another process counts too, so keep max_files well above the
number of concurrent runs). The same line goes to `logging.getLogger("entropy_core")` (INFO for
minimal/standard, DEBUG above), which the library never configures; the pipeline decides where it shows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import enum
import gzip as _gzip
import json
import logging as _logging
import math
import os
import re
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["DetailedLogger", "StageTimer", "Progress", "LEVELS"]

LEVELS = {"minimal": 0, "standard": 1, "detailed": 2, "debug": 3}
_STD_LEVELS = {"minimal": _logging.INFO, "standard": _logging.INFO,
               "detailed": _logging.DEBUG, "debug": _logging.DEBUG}
_DATE_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_logging.getLogger("entropy_core").addHandler(_logging.NullHandler())


def _check_level(level: str) -> int:
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {list(LEVELS)}")
    return LEVELS[level]


def _loggable(x: Any, max_inline: int) -> Any:
    """JSON-safe copy of a field value; big tensors/arrays become a shape/dtype summary."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)                   # 'nan', 'inf', '-inf'
    if isinstance(x, torch.Tensor):
        if x.numel() <= max_inline:
            return _loggable(x.detach().cpu().tolist(), max_inline)  # small: a sync is cheap
        return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."), "device": str(x.device)}
    if isinstance(x, np.ndarray):
        if x.size <= max_inline:
            return _loggable(x.tolist(), max_inline)
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return _loggable(x.item(), max_inline)
    if isinstance(x, Mapping):
        return {str(k): _loggable(v, max_inline) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_loggable(v, max_inline) for v in x]
    if isinstance(x, enum.Enum):
        return _loggable(x.value, max_inline)
    if isinstance(x, (os.PathLike, torch.dtype, torch.device)):
        return str(x).removeprefix("torch.")
    if isinstance(x, BaseException):
        return f"{type(x).__name__}: {x}"
    if hasattr(x, "model_dump"):                                      # pydantic model
        return _loggable(x.model_dump(mode="json"), max_inline)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _loggable(dataclasses.asdict(x), max_inline)
    r = repr(x)
    return r if len(r) <= 200 else r[:197] + "..."


def _short(v: Any) -> str:
    """Value as it appears in the one-line human message."""
    if isinstance(v, float):
        return f"{v:.4g}"
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


@dataclasses.dataclass
class StageTimer:
    """Yielded by `DetailedLogger.stage`; `elapsed_s` is live inside the block and fixed after it."""
    name: str
    start: float = dataclasses.field(default_factory=time.perf_counter)
    end: float | None = None

    @property
    def elapsed_s(self) -> float:
        return (self.end if self.end is not None else time.perf_counter()) - self.start


class Progress:
    """Counts work done and logs a `progress` record at every `every_fraction` of `total`, at most
    `every_seconds` apart otherwise, and once at the end (done, total, elapsed_s, rate_per_s, eta_s)."""

    def __init__(self, logger: DetailedLogger, desc: str, total: int | None, *,
                 every_fraction: float = 0.1, every_seconds: float = 30.0, level: str = "standard"):
        if not 0 < every_fraction <= 1:
            raise ValueError(f"every_fraction must be in (0, 1], got {every_fraction}")
        _check_level(level)
        self.logger, self.desc, self.total, self.level = logger, desc, total, level
        self.every_seconds = every_seconds
        self.done = 0
        self._steps = max(1, round(1 / every_fraction))   # integer buckets: no float drift at 30%
        self._bucket = 0
        self._start = self._last = time.perf_counter()
        self._closed = False
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            due = now - self._last >= self.every_seconds
            if self.total:
                bucket = min(self.done, self.total) * self._steps // self.total
                due, self._bucket = due or bucket > self._bucket, max(bucket, self._bucket)
            if due:
                self._emit(now)

    def _emit(self, now: float, event: str = "progress") -> None:
        self._last = now
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else None
        eta = (self.total - self.done) / rate if self.total and rate else None
        self.logger.log(event, self.level, desc=self.desc, done=self.done, total=self.total,
                        elapsed_s=round(elapsed, 3), rate_per_s=rate, eta_s=eta)

    def close(self) -> None:
        """Log the final count once (`progress_end`)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._emit(time.perf_counter(), "progress_end")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DetailedLogger:
    """JSON-lines run log with levels, stage timing and progress; see the module docstring.

    Args:   log_dir: folder for the dated log files; None logs to `logging` only.
            run_name: file name prefix (characters outside [A-Za-z0-9_.-] become '_').
            level: 'minimal' | 'standard' | 'detailed' | 'debug'.
            gzip: write `.jsonl.gz`.
            max_files: keep at most this many log files under log_dir (None keeps all).
            max_inline: tensors/arrays with at most this many elements are logged in full.
            logger: the `logging.Logger` to mirror to (default 'entropy_core').
    Writes are serialised by a lock, so threads may share one logger.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, run_name: str = "run",
                 level: str = "standard", *, gzip: bool = False, max_files: int | None = 100,
                 max_inline: int = 16, logger: _logging.Logger | None = None):
        self.level = level
        self._level = _check_level(level)
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
        self.run_name = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name) or "run"
        self.max_inline = max_inline
        self.std_logger = logger or _logging.getLogger("entropy_core")
        self.timings: dict[str, float] = {}          # stage name -> total seconds of completed stages
        self._lock = threading.Lock()
        self._file = None
        self.path: Path | None = None
        if log_dir is not None:
            log_dir = Path(log_dir)
            if max_files is not None:
                _enforce_retention(log_dir, keep=max_files - 1)
            self.path, self._file = _open_new(log_dir, self.run_name, gzip)
            self._finalizer = weakref.finalize(self, self._file.close)
        self._closed = False

    # -- records --------------------------------------------------------------------------------
    def enabled(self, level: str) -> bool:
        """Whether a record at `level` would be written (check before computing expensive fields)."""
        return _check_level(level) <= self._level

    def log(self, event: str, level: str = "standard", **fields: Any) -> None:
        """Write one record if `level` is enabled, and mirror it to the `logging` logger."""
        if not self.enabled(level):
            return
        if self._closed:
            raise RuntimeError(f"DetailedLogger({self.path}) is closed; cannot log {event!r}")
        fields = {k: _loggable(v, self.max_inline) for k, v in fields.items()}
        if self._file is not None:
            record = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                      "level": level, "event": event, "fields": fields}
            line = json.dumps(record, allow_nan=False) + "\n"
            with self._lock:
                self._file.write(line)
                if not isinstance(self._file, _gzip.GzipFile):   # per-line flush would ruin compression
                    self._file.flush()
        if self.std_logger.isEnabledFor(_STD_LEVELS[level]):
            message = " ".join([event] + [f"{k}={_short(v)}" for k, v in fields.items()])
            self.std_logger.log(_STD_LEVELS[level], message)

    # -- helpers --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, name: str, level: str = "standard", **fields: Any) -> Iterator[StageTimer]:
        """Time a block: logs stage_start, then stage_end with elapsed_s (or stage_error at 'minimal'
        with the exception, re-raised). Yields a StageTimer; completed times add up in `self.timings`."""
        _check_level(level)
        self.log("stage_start", level, stage=name, **fields)
        timer = StageTimer(name)
        try:
            yield timer
        except BaseException as e:
            timer.end = time.perf_counter()
            self.log("stage_error", "minimal", stage=name, elapsed_s=timer.elapsed_s, error=e)
            raise
        timer.end = time.perf_counter()
        with self._lock:
            self.timings[name] = self.timings.get(name, 0.0) + timer.elapsed_s
        self.log("stage_end", level, stage=name, elapsed_s=timer.elapsed_s)

    def progress(self, desc: str, total: int | None = None, *, every_fraction: float = 0.1,
                 every_seconds: float = 30.0, level: str = "standard") -> Progress:
        """A `Progress` counter: call `.update(n)`, and `.close()` (or use it as a context manager)."""
        return Progress(self, desc, total, every_fraction=every_fraction, every_seconds=every_seconds,
                        level=level)

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._file is not None:
                    self._finalizer()                 # closes the file exactly once

    def __enter__(self) -> DetailedLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_new(log_dir: Path, run_name: str, gzip: bool):
    """Create `<log_dir>/<date>/<run>-<HHMMSS>-<pid>[-k].jsonl[.gz]` exclusively (never append to another run)."""
    now = _dt.datetime.now(_dt.timezone.utc)
    day = log_dir / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if gzip else ".jsonl"
    stem = f"{run_name}-{now.strftime('%H%M%S')}-{os.getpid()}"
    for k in range(1000):
        path = day / (stem + (f"-{k}" if k else "") + suffix)
        try:
            if gzip:
                return path, _gzip.open(path, "xt", encoding="utf-8")
            return path, open(path, "x", encoding="utf-8")
        except FileExistsError:
            continue
    raise FileExistsError(f"could not find a free log file name for {day / stem}{suffix}")


def _enforce_retention(log_dir: Path, keep: int) -> None:
    """Delete the oldest (by mtime) .jsonl/.jsonl.gz files under log_dir until `keep` remain; drop empty date dirs."""
    if not log_dir.is_dir():
        return
    files = []
    for p in log_dir.rglob("*"):
        if p.name.endswith((".jsonl", ".jsonl.gz")):
            try:
                files.append((p.stat().st_mtime, str(p), p))
            except FileNotFoundError:                 # deleted by another process meanwhile
                continue
    files.sort()
    for _, _, p in files[: max(0, len(files) - keep)]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    for d in log_dir.iterdir():
        if d.is_dir() and _DATE_DIR.match(d.name):
            with contextlib.suppress(OSError):        # not empty, or already gone
                d.rmdir()
