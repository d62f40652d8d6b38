"""Process tuning: the allocator switch and its flag."""

from __future__ import annotations

import platform

import pytest

from service import runtime
from service.cli.serve import parser
from service.config import Settings


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_tuning_is_accepted_by_glibc():
    assert runtime.tune_allocator() is True


def test_allocator_tuning_is_on_by_default_and_has_an_off_switch():
    assert Settings().tune_allocator is True
    off = parser().parse_args(["--no-tune-allocator"])
    on = parser().parse_args(["--log-json"])
    assert off.tune_allocator is False
    assert on.tune_allocator is None and on.log_json is True  # None: the setting's default applies


def test_cpu_layout_splits_the_cores_between_single_threaded_replicas_unless_told():
    assert runtime.cpu_layout(2, None, None) == (2, 1)
    assert runtime.cpu_layout(1, None, None) == (1, 1)
    assert runtime.cpu_layout(32, None, None) == (runtime.MAX_AUTO_CPU_REPLICAS, 32 // runtime.MAX_AUTO_CPU_REPLICAS)
    assert runtime.cpu_layout(8, None, 3) == (1, 3)  # threads given: one replica with them
    assert runtime.cpu_layout(8, 3, None) == (3, 2)  # replicas given: the cores shared evenly
    assert runtime.cpu_layout(2, 4, None) == (4, 1)
    assert runtime.cpu_layout(8, 2, 2) == (2, 2)
    assert 1 <= runtime.usable_cores()
