"""The ages `pacsai studies purge --older-than` takes."""

from __future__ import annotations

from datetime import timedelta

import click
import pytest

from pacsai.cli.studies import Duration


@pytest.mark.parametrize(
    ("text", "age"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("2w", timedelta(weeks=2)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1.5d", timedelta(days=1, hours=12)),
        (" 7D ", timedelta(days=7)),
        ("P30D", timedelta(days=30)),
        ("PT12H", timedelta(hours=12)),
        ("0s", timedelta(0)),
    ],
)
def test_ages_are_read(text: str, age: timedelta) -> None:
    assert Duration().convert(text, None, None) == age


@pytest.mark.parametrize("text", ["", "a while", "30", "30 days ago", "d30", "3x"])
def test_anything_else_says_how_to_write_an_age(text: str) -> None:
    with pytest.raises(click.BadParameter, match="30d, 12h, 2w"):
        Duration().convert(text, None, None)
