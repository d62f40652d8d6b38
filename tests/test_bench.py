"""The benchmark's plumbing runs end to end on tiny settings. No timing is checked: benchmarks
are not tests, and this machine's figures say nothing about correctness."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import path as path_bench
from bench import profile
from bench.__main__ import main
from bench.compare import compare


@pytest.mark.slow
def test_bench_quick_plumbing(tmp_path):
    out = tmp_path / "bench"
    assert main(["--quick", "--batches", "1", "--clients", "1,2", "--endpoints", "rollout-json",
                 "--batching", "default", "--duration", "0.5", "--warmup", "0.2", "--path-cases", "rollout-json",
                 "--capture-families", "near-zero", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["engine"]) == {"bare", "rollout", "grad_rollout", "grad_floor", "fwd_full_bwd", "naive"}
    assert set(results["plain_process"]) == {"bare", "grad_floor"}  # the issue-check reference, own process
    assert results["naive_max_abs_diff"] < 3e-3  # the baseline computes the same maps
    cells = results["served"]["cells"]
    assert [c["clients"] for c in cells] == [1, 2] and all(c["errors"] == 0 for c in cells)
    assert all(c["requests"] > 0 for c in cells)
    assert results["served"]["peak_rss_mb"]["default"] > 0
    assert {t["name"] for t in results["targets"]}  # every target is listed, even when n/a
    check_path_part(results["path"], path_bench.loader_name(), "auto", ["rollout-json"])  # part D, one case
    assert set(results["capture"]) == {"near-zero"} and results["capture"]["near-zero"]["ratio_cpu"] > 0  # part F
    assert any("server CPU per request" in t["name"] for t in results["targets"])
    text = (out / "results.md").read_text()
    assert "| near-zero | 2 |" in text  # part F's row
    assert "Targets" in text and "part D" in text and (out / "MACHINE.md").exists()
    actmax = results["actmax"]  # part G: a step per copies count against its floor, the default's time
    assert set(actmax["ms"]) >= {"fourier 4", "fwd+bwd 4", "fwd+bwd 18", "pixel"} and actmax["default_s"] > 0
    assert "Activation maximization's step" in text


def test_profile_prints_the_busiest_ops_of_each_case(capsys):
    threads = torch.get_num_threads()
    try:
        assert profile.main(["--cases", "bare,rollout", "--batch", "1", "--reps", "1", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "bare: 1 batches of 1" in out and "rollout: 1 batches of 1" in out
    assert "aten::bmm" in out  # rollout writes the attention out instead of the fused kernel


@pytest.mark.slow  # no figure is judged, only that both servers answered in every window: beside other tests
def test_compare_alternates_two_servers_from_their_own_trees(tmp_path):
    here = Path(__file__).resolve().parents[1]
    lines: list[str] = []
    # 1.5 s windows: a saturated machine served no request in some 0.5 s window (rollout takes 0.05 s alone)
    out = compare([here, here], ["rollout-json"], clients=2, reps=2, duration=1.5, warmup=0.2,
                  workdir=tmp_path, log=lines.append)
    assert list(out) == ["rollout-json"] and all(len(v) == 2 and min(v) > 0 for v in out["rollout-json"])
    assert "faster in" in lines[-1]


# -- part D: the request path (bench/path.py) ------------------------------------------------------
_SHORT = {**path_bench.QUICK, "warmup": 0.3, "duration": 1.0, "clients": 2}


@pytest.mark.solo  # counts the server's CPU per request: after the parallel run (Makefile)
@pytest.mark.slow
def test_path_part_measures_server_cpu_per_request_and_the_floor_app(tmp_path):
    """The Python load generator with the floor app; wrk (the default loader where installed) drives
    part D in test_bench_quick_plumbing, which checks the same."""
    keys = ["floor", "rollout-json"]
    check_path_part(path_bench.run_path_bench(tmp_path, _SHORT, "json", keys, loader="python"), "python", "json", keys)


def check_path_part(out: dict, loader: str, body: str, keys: list[str]) -> None:
    """Part D's results: one case measured, the server's CPU per request above the load generator's."""
    assert out["loader"] == loader and out["body"] in (("json",) if body == "json" else ("raw", "multipart"))
    [case] = out["cases"]
    assert case["case"] == "rollout-json" and case["errors"] == 0 and case["requests"] > 0
    assert case["answer_size"] is None and case["answer_bytes"] > 0  # a JSON answer, probed once
    # the server's tree did the work, not the load generator (wrk may use under one 10 ms tick in a second)
    assert case["cpu_ms_per_req"] > case["loader_cpu_ms_per_req"] >= 0 and case["server_cores"] > 0
    assert out["workers"] is None and out["deit"] is None  # only what was asked
    [row] = [t for t in path_bench.targets(out) if "CPU per request" in t["name"]]
    assert row["value"] == case["cpu_ms_per_req"] and row["pass"] in (True, False)
    text = "\n".join(path_bench.render(out))
    assert "224 px JPEG -> /rollout JSON" in text and "<= 1.2" in text
    if "floor" in keys:  # the minimal FastAPI app answered the same body, and the service is compared with it
        assert out["floor"]["requests"] > 0 and out["floor"]["errors"] == 0 and out["floor"]["cpu_ms_per_req"] > 0
        assert "the floor app's CPU" in text
    else:
        assert out["floor"] is None


@pytest.mark.solo  # counts CPU: after the parallel run (Makefile)
def test_tree_cpu_counts_every_descendant():
    """A grandchild that burns 0.3 s of CPU counts in the root's tree, and not in the root's own time."""
    burn = ("import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            "print('done', flush=True)\nsys.stdin.read()")  # then waits for stdin to close
    middle = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    root = subprocess.Popen([sys.executable, "-c", middle], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert root.stdout.readline().strip() == "done"  # the grandchild has burnt its CPU and is alive
        own = path_bench._proc_stats()[root.pid][1] / path_bench._TICK
        assert path_bench.tree_cpu_s(root.pid) >= own + 0.25
    finally:
        root.stdin.close()  # the grandchild reads EOF and ends, then the root
        root.wait(timeout=30)


def test_photo_jpegs_are_the_sizes_of_photos():
    small = path_bench.photo_jpeg(224, 224)
    large = path_bench.photo_jpeg(1920, 1280)
    with Image.open(io.BytesIO(small)) as im:
        assert im.format == "JPEG" and im.size == (224, 224)
    assert 8_000 < len(small) < 30_000 and 300_000 < len(large) < 800_000  # issue 17: ~15 KB and ~500 KB
    assert path_bench.photo_jpeg(224, 224) == small  # seeded: every run uploads the same bytes


def test_path_targets_say_by_how_much_and_skip_ratios_from_a_busy_machine():
    case = {"title": "224 px JPEG -> /rollout JSON", "target_ms": 1.2, "cpu_ms_per_req": 3.0}
    deit = {"clients": 16, "batch": 16,
            "rollout": {"ratio": 0.7, "others_cores": 0.0, "floor_others_cores": 0.0},
            "grad-rollout": {"ratio": 2.4, "others_cores": 0.1,
                             "floor_others_cores": 0.9 * path_bench._busy_cores() + 1}}
    rows = {t["name"].split(",")[0]: t for t in path_bench.targets({"cases": [case], "workers": None, "deit": deit})}
    cpu = rows["server CPU per request"]
    assert cpu["pass"] is False and path_bench.verdict(cpu["value"], 1.2, "<=") == "missed by 2.5x (+1.8 ms)"
    assert rows["DeiT-Tiny /rollout JSON"]["pass"] is False  # a quiet machine: judged
    assert rows["DeiT-Tiny /grad-rollout JSON"]["pass"] is None  # others took cores meanwhile: not judged
    assert "not judged" in rows["DeiT-Tiny /grad-rollout JSON"]["note"]
    assert rows["--workers 2 / --workers 1 req/s"]["pass"] is None  # not run
