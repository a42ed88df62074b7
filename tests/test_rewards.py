"""Rewards: gsm8k_tag on a table of responses, user "module:function" rewards, errors, and worker threads."""
import re
import sys
import threading

import pytest

from entropy_core.data import RewardError, compute_rewards, get_reward_fn, gsm8k_tag

GOLD = "72"

# (response continuing a prompt that ended in "<think>", reward with format_weight=0, with format_weight=0.1)
CASES = {
    "one block right": (" 48/2 = 24, 48 + 24 = 72 </think> <answer> 72 </answer>", 1.0, 1.0),
    "72.0": (" ... </think> <answer>72.0</answer>", 1.0, 1.0),
    "latex fraction": (" ... </think> <answer>\\frac{144}{2}</answer>", 1.0, 1.0),
    "dollar math": (" ... </think> <answer>$72$</answer>", 1.0, 1.0),
    "boxed": (" ... </think> <answer>\\boxed{72}</answer>", 1.0, 1.0),
    "thousands comma": (" ... </think> <answer>1,000</answer>", 0.0, 0.1),
    "wrong number": (" ... </think> <answer> 71 </answer>", 0.0, 0.1),
    "empty answer": (" ... </think> <answer></answer>", 0.0, 0.1),
    "two blocks": (" ... </think> <answer>72</answer> <answer>72</answer>", 0.0, 0.0),
    "stray open tag": (" ... </think> <answer>72</answer> <answer>", 0.0, 0.0),
    "missing tags": (" 48 + 24 = 72. The answer is 72.", 0.0, 0.0),
    "no </think>, right": (" 72 <answer>72</answer>", 1.0, 1.0),
    "no </think>, wrong": (" 71 <answer>71</answer>", 0.0, 0.0),
    "</think> after answer": (" <answer>71</answer> </think>", 0.0, 0.0),
}


@pytest.mark.parametrize("name", CASES)
def test_gsm8k_tag_table(name):
    response, plain, with_format = CASES[name]
    assert gsm8k_tag(response, GOLD) == plain, name
    assert gsm8k_tag(response, GOLD, format_weight=0.1) == with_format, name


def test_gsm8k_tag_gold_forms():
    assert gsm8k_tag("</think> <answer>1000</answer>", "1000") == 1.0
    assert gsm8k_tag("</think> <answer>0.5</answer>", "1/2") == 1.0


def test_gsm8k_tag_bad_arguments():
    with pytest.raises(RewardError, match="format_weight must be in \\[0, 1\\], got 1.5"):
        gsm8k_tag("</think> <answer>72</answer>", GOLD, format_weight=1.5)
    with pytest.raises(RewardError, match="gold answer 'n/a' does not parse"):
        gsm8k_tag("</think> <answer>72</answer>", "n/a")


def test_get_reward_fn_by_name_passes_kwargs():
    fn = get_reward_fn("gsm8k_tag", format_weight=0.25)
    assert fn.spec == "gsm8k_tag"
    assert compute_rewards(fn, ["</think> <answer>72</answer>", "</think> <answer>7</answer>", "72"],
                           [GOLD] * 3) == [1.0, 0.25, 0.0]


def test_gsm8k_tag_in_worker_thread():
    """Prefect runs tasks in worker threads, where math-verify's signal.alarm timeout would raise."""
    fn = get_reward_fn("gsm8k_tag")
    results, errors = [], []

    def work():
        try:
            results.append(compute_rewards(fn, [" </think> <answer>\\frac{144}{2}</answer>", "<answer>7</answer>"],
                                           [GOLD, GOLD]))
        except Exception as e:  # re-raised in the main thread so the test reports it
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors, errors
    assert results == [[1.0, 0.0]]


# --------------------------------------------------------------------------------------------------
# user rewards from "module:function"

USER_MODULE = '''
def exact(response_text, gold):
    return float(response_text.strip() == gold)

def scaled(response_text, gold, *, scale=1.0):
    return scale * len(response_text)

def boom(response_text, gold):
    raise KeyError("no such thing")

def not_a_number(response_text, gold):
    return float("nan") if response_text == "nan" else "high"

not_callable = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    for name in ("my_rewards", "broken_rewards"):  # the next test imports its own copy
        sys.modules.pop(name, None)


def test_user_function_reward(user_module):
    fn = get_reward_fn(f"{user_module}:exact")
    assert compute_rewards(fn, ["72", " 71 "], [GOLD, GOLD]) == [1.0, 0.0]
    assert compute_rewards(get_reward_fn(f"{user_module}:scaled", scale=2.0), ["abc"], [GOLD]) == [6.0]


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz' "
                             "(ModuleNotFoundError"),
    ("broken_rewards:f", "reward 'broken_rewards:f': cannot import module 'broken_rewards' (ModuleNotFoundError: "
                         "No module named 'does_not_exist_anywhere')"),
    ("my_rewards:missing", "reward 'my_rewards:missing': my_rewards has no attribute 'missing'"),
    ("my_rewards:not_callable", "reward 'my_rewards:not_callable' is a int, not a callable"),
    ("my_rewards:", "reward 'my_rewards:': expected 'module:function'"),
    ("nope", "unknown reward 'nope': known names are gsm8k_tag"),
])
def test_get_reward_fn_errors(user_module, spec, message):
    with pytest.raises(RewardError, match=re.escape(message)):
        get_reward_fn(spec)


def test_kwargs_that_do_not_fit_fail_at_resolve_time(user_module):
    with pytest.raises(RewardError, match=re.escape("reward 'my_rewards:exact' cannot be called as "
                                                    "fn(response_text, gold, scale=…)")):
        get_reward_fn("my_rewards:exact", scale=2.0)


def test_raising_user_function_names_spec_index_and_cause(user_module):
    fn = get_reward_fn("my_rewards:boom")
    with pytest.raises(RewardError, match=re.escape("reward 'my_rewards:boom' raised on response 0: "
                                                    "KeyError: 'no such thing'")) as info:
        compute_rewards(fn, ["a", "b"], [GOLD, GOLD])
    assert isinstance(info.value.__cause__, KeyError)


def test_non_numeric_and_non_finite_rewards_are_listed(user_module):
    fn = get_reward_fn("my_rewards:not_a_number")
    with pytest.raises(RewardError, match=re.escape("reward 'my_rewards:not_a_number' returned 2 values that are "
                                                    "not finite real numbers: response 0 -> nan, "
                                                    "response 1 -> 'high'")):
        compute_rewards(fn, ["nan", "x"], [GOLD, GOLD])


def test_length_mismatch():
    with pytest.raises(RewardError, match="2 responses but 1 gold answers"):
        compute_rewards(get_reward_fn("gsm8k_tag"), ["a", "b"], [GOLD])
