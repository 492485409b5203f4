"""Shared by the benchmark tests: every number in a result JSON, with where it sits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def json_numbers(value: Any, where: str = "results") -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_numbers(item, f"{where}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield where, value
