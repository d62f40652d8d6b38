"""Process tuning: the allocator switch and its flag."""

from __future__ import annotations

import platform

import pytest

from service import runtime
from service.__main__ import _parser
from service.config import Settings


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_is_accepted_by_glibc():
    assert runtime.tune_allocator() is True


def test_allocator_tuning_is_on_by_default_and_has_an_off_switch():
    assert Settings().tune_allocator is True
    off = _parser().parse_args(["serve", "--no-tune-allocator"])
    on = _parser().parse_args(["serve", "--log-json"])
    assert off.tune_allocator is False
    assert on.tune_allocator is None and on.log_json is True  # None: the setting's default applies
