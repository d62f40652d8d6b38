"""The benchmark's plumbing runs end to end on tiny settings. No timing is checked: benchmarks
are not tests, and this machine's figures say nothing about correctness."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import profile
from bench.compare import compare
from bench.__main__ import main


def test_bench_quick_plumbing(tmp_path):
    out = tmp_path / "bench"
    assert main(["--quick", "--batches", "1", "--clients", "1,2", "--endpoints", "rollout-json",
                 "--batching", "default", "--duration", "1.5", "--warmup", "0.2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["engine"]) == {"bare", "rollout", "grad_rollout", "grad_floor", "fwd_full_bwd", "naive"}
    assert set(results["plain_process"]) == {"bare", "grad_floor"}  # the issue-check reference, own process
    assert results["naive_max_abs_diff"] < 3e-3  # the baseline computes the same maps
    cells = results["served"]["cells"]
    assert [c["clients"] for c in cells] == [1, 2] and all(c["errors"] == 0 for c in cells)
    assert all(c["requests"] > 0 for c in cells)
    assert results["served"]["peak_rss_mb"]["default"] > 0
    assert {t["name"] for t in results["targets"]}  # every target is listed, even when n/a
    assert "Targets" in (out / "results.md").read_text() and (out / "MACHINE.md").exists()


def test_profile_prints_the_busiest_ops_of_each_case(capsys):
    threads = torch.get_num_threads()
    try:
        assert profile.main(["--cases", "bare,rollout", "--batch", "1", "--reps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "bare: 1 batches of 1" in out and "rollout: 1 batches of 1" in out
    assert "aten::bmm" in out  # rollout writes the attention out instead of the fused kernel


def test_compare_alternates_two_servers_from_their_own_trees(tmp_path):
    here = Path(__file__).resolve().parents[1]
    lines: list[str] = []
    out = compare([here, here], ["rollout-json"], clients=2, reps=2, duration=0.5, warmup=0.2,
                  workdir=tmp_path, log=lines.append)
    assert list(out) == ["rollout-json"] and all(len(v) == 2 and min(v) > 0 for v in out["rollout-json"])
    assert "faster in" in lines[-1]
