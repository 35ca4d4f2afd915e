"""The rules a setting's value must follow, each worded as the end of its refusal, and the one refusal of a value
that breaks its rule: shared by the typed config (mswa/config.py) and every command that takes settings of its
own (mswa.evaluate, mswa.sample), so that one kind of value is checked, and refused, one way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


@dataclass(frozen=True)
class Rule:
    """What a value must be, as the sentence a refusal ends with, and the test of it."""

    must_be: str
    ok: Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def one_of(choices: Collection) -> Rule:
    return Rule(f"one of {', '.join(dict.fromkeys(map(str, choices)))}", lambda v: v in choices)


POSITIVE = Rule("an integer >= 1", lambda v: is_int(v) and v >= 1)
NON_NEGATIVE = Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
SEED = Rule(f"an integer in [0, {2**32 - 1}]", lambda v: is_int(v) and 0 <= v < 2**32)
POSITIVE_OR_NULL = Rule("an integer >= 1, or null", lambda v: v is None or POSITIVE.ok(v))
RATE = Rule("a finite number >= 0", lambda v: is_number(v) and v >= 0)
RATE_OR_NULL = Rule("a finite number >= 0, or null (no clipping)", lambda v: v is None or RATE.ok(v))
FRACTION = Rule("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1)
PROBABILITY = Rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1)
BETAS = Rule("two numbers in [0, 1), e.g. [0.9, 0.95]", lambda v: isinstance(v, list) and len(v) == 2 and all(PROBABILITY.ok(b) for b in v))
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
THREADS = Rule("an integer >= 1, or null (torch's default)", POSITIVE_OR_NULL.ok)


def is_folder_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value


def is_devices(value: Any) -> bool:
    """What lightning.Trainer(devices=) takes: a count, -1 (all), auto, or the indices of the devices."""
    if isinstance(value, list):
        return bool(value) and all(NON_NEGATIVE.ok(index) for index in value)
    return (is_int(value) and (value >= 1 or value == -1)) or value == "auto"


# a name Hydra joins into the run's path (paths.log_dir/<task_name>/runs/...): one folder, inside paths.log_dir
FOLDER_NAME = Rule("a plain folder name (no '/', not '.' or '..')", is_folder_name)
DEVICES = Rule("an integer >= 1, -1 (every device), auto, or a list of device indices", is_devices)


def check_value(key: str, value: Any, rule: Rule | None) -> None:
    """The one refusal of a value that breaks its rule: the key, the value, what it must be."""
    if rule is not None and not rule.ok(value):
        raise ConfigError(f"{key}={value!r} must be {rule.must_be}")
