"""Rewards r(response, gold) for the update batch U (DESIGN §1.1: A = r − mean_group(r)).

`gsm8k_tag` scores R1-format responses: the prompt ends with "<think>", so a response reads
"… </think> <answer> 72 </answer>". `get_reward_fn(spec)` resolves a registered name or a user
"module:function"; `compute_rewards` calls it over a batch and turns a user function's exception,
or a reward that is not a finite number, into a `RewardError` naming the response.
"""
from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from math_verify import parse, verify

# math-verify bounds parse/verify with signal.alarm, which only works in the main thread; Prefect
# runs tasks in worker threads, where we pass None (no timeout) instead of letting it raise.
_MATH_VERIFY_TIMEOUT_S = 5

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class RewardError(ValueError):
    """A reward spec that cannot be resolved, or a reward function that failed or returned a non-number."""


def gsm8k_tag(response_text: str, gold: str, *, format_weight: float = 0.0) -> float:
    """1.0 if the response has exactly one <answer>…</answer> block whose content equals `gold`
    mathematically (math-verify: "72", "72.0", "\\frac{144}{2}", "$72$" all equal "72"), else 0.0.

    A wrong (or unparseable) answer in a well-formed response (one answer block, with "</think>"
    before it) gets `format_weight` instead, so r = max(correct, format_weight · well_formed) ≤ 1.
    math-verify is lenient inside the block: it takes the last number ("71 or 72" counts as 72),
    ignores units ("72 dollars") and reads "72%" as 72; "1,000" is 1000.
    Raises: RewardError if format_weight is outside [0, 1] or `gold` does not parse as math.
    """
    if not 0.0 <= format_weight <= 1.0:
        raise RewardError(f"gsm8k_tag: format_weight must be in [0, 1], got {format_weight!r}")
    blocks = _ANSWER_BLOCK.findall(response_text)
    one_block = len(blocks) == 1 and response_text.count("<answer>") == 1 and response_text.count("</answer>") == 1
    if not one_block:
        return 0.0
    if _math_equal(blocks[0], gold):
        return 1.0
    well_formed = "</think>" in response_text[:response_text.index("<answer>")]
    return format_weight if well_formed else 0.0


def _math_equal(answer: str, gold: str) -> bool:
    """math-verify equality, with signal-based timeouts only where signals work (the main thread)."""
    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(gold, parsing_timeout=timeout)
    if not gold_parsed:
        raise RewardError(f"gsm8k_tag: gold answer {gold!r} does not parse as a number or expression")
    return verify(gold_parsed, parse(answer, parsing_timeout=timeout), timeout_seconds=timeout)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_tag_shaped(response_text: str, gold: str, *, format_weight: float = 0.1) -> float:
    """gsm8k_tag (1 correct, `format_weight` well-formed, else 0) when it is > 0; otherwise a shaping
    credit in [0, format_weight/2] for how close the response's last number x is to the gold g:
    (format_weight/2) · exp(−|x − g| / max(1, |g|)); 0 when there is no number or g is not one.
    A demo reward only: it gives a model that never uses the answer tags a non-zero advantage."""
    r = gsm8k_tag(response_text, gold, format_weight=format_weight)
    if r > 0:
        return r
    numbers = _NUMBER.findall(response_text)
    try:
        x, g = float(numbers[-1].replace(",", "")), float(gold.replace(",", ""))
    except (IndexError, ValueError):
        return 0.0
    if not (math.isfinite(x) and math.isfinite(g)):
        return 0.0
    return 0.5 * format_weight * math.exp(-abs(x - g) / max(1.0, abs(g)))


_REWARDS: dict[str, Callable[..., float]] = {"gsm8k_tag": gsm8k_tag, "gsm8k_tag_shaped": gsm8k_tag_shaped}


@dataclass(frozen=True)
class RewardFn:
    """A resolved reward: calling it gives fn(response_text, gold, **kwargs); `spec` names it in errors."""

    spec: str
    fn: Callable[..., float]
    kwargs: dict = field(default_factory=dict)

    def __call__(self, response_text: str, gold: str) -> float:
        return self.fn(response_text, gold, **self.kwargs)


def get_reward_fn(spec: str, **kwargs) -> RewardFn:
    """The reward (response_text, gold) -> float for a registered name ("gsm8k_tag") or "module:function".

    `kwargs` are passed on every call (e.g. format_weight=0.1 for gsm8k_tag).
    Raises: RewardError naming the spec when the name is unknown, the module cannot be imported,
    the attribute is missing, or it is not callable as fn(response_text, gold, **kwargs).
    """
    if spec in _REWARDS:
        fn = _REWARDS[spec]
    elif ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        if not module_name or not attr_path:
            raise RewardError(f"reward {spec!r}: expected 'module:function' with both parts non-empty")
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:  # a user module may fail with anything at import time
            raise RewardError(f"reward {spec!r}: cannot import module {module_name!r} "
                              f"({type(e).__name__}: {e}); is it on sys.path / PYTHONPATH?") from e
        owner = module_name
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise RewardError(f"reward {spec!r}: {owner} has no attribute {attr!r}")
            obj, owner = getattr(obj, attr), f"{owner}.{attr}"
        if not callable(obj):
            raise RewardError(f"reward {spec!r} is a {type(obj).__name__}, not a callable "
                              "(response_text, gold) -> float")
        fn = obj
    else:
        raise RewardError(f"unknown reward {spec!r}: known names are {', '.join(sorted(_REWARDS))}, "
                          "or give 'module:function' for your own (response_text, gold) -> float")
    _check_signature(spec, fn, kwargs)
    return RewardFn(spec=spec, fn=fn, kwargs=dict(kwargs))


def _check_signature(spec: str, fn: Callable, kwargs: dict) -> None:
    """Fail at resolve time, not mid-batch, when fn cannot take (response_text, gold, **kwargs)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C callables expose no signature
        return
    try:
        sig.bind("", "", **kwargs)
    except TypeError as e:
        raise RewardError(f"reward {spec!r} cannot be called as fn(response_text, gold"
                          f"{''.join(', ' + k + '=…' for k in kwargs)}): {e}") from None


def compute_rewards(fn: Callable[[str, str], float], responses: Sequence[str], golds: Sequence[str]) -> list[float]:
    """[fn(responses[i], golds[i]) as float for each i].

    Raises: RewardError naming the spec and the response index when fn raises (chained to the
    original exception), and listing every response whose reward is not a finite real number.
    """
    spec = fn.spec if isinstance(fn, RewardFn) else getattr(fn, "__qualname__", repr(fn))
    if len(responses) != len(golds):
        raise RewardError(f"reward {spec!r}: {len(responses)} responses but {len(golds)} gold answers")
    rewards, bad = [], []
    for i, (response, gold) in enumerate(zip(responses, golds)):
        try:
            r = fn(response, gold)
        except Exception as e:  # any failure of a user function becomes one clear error
            raise RewardError(f"reward {spec!r} raised on response {i}: {type(e).__name__}: {e}") from e
        if isinstance(r, numbers.Real) and math.isfinite(r):
            rewards.append(float(r))
        else:
            bad.append(f"response {i} -> {r!r}")
    if bad:
        raise RewardError(f"reward {spec!r} returned {len(bad)} values that are not finite real numbers: "
                          + ", ".join(bad))
    return rewards
