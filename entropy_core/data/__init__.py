"""Prompts, gold answers and rewards: the dataset registry and the reward registry."""
from entropy_core.data.datasets import (
    DatasetError,
    DatasetLoader,
    Example,
    gsm8k_r1_template,
    load_dataset_split,
    parse_gsm8k_answer,
    register_dataset,
    render_prompt,
)
from entropy_core.data.rewards import RewardError, RewardFn, compute_rewards, get_reward_fn, gsm8k_tag

__all__ = [
    "DatasetError",
    "DatasetLoader",
    "Example",
    "RewardError",
    "RewardFn",
    "compute_rewards",
    "get_reward_fn",
    "gsm8k_r1_template",
    "gsm8k_tag",
    "load_dataset_split",
    "parse_gsm8k_answer",
    "register_dataset",
    "render_prompt",
]
