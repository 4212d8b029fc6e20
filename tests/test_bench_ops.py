"""bench_ops.py end to end at tiny sizes: the main case is the training default
(soft / soft, ε=2), the strategies table keeps the old main case (soft / uniform)
as a row, the N- and B-scaling and peak-memory tables, the log-log PNG beside the
results, and the JSON's record of the main case that --guard checks."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch

import overlap_sampler
from overlap_sampler.sampling.config import SamplerConfig

TINY = ["--main-size", "2", "300", "10", "--n-scaling", "200", "400", "--b-scaling", "1", "2", "--repeats", "1"]


@pytest.fixture(scope="module")
def run(bench_ops, tmp_path_factory):
    """(markdown, json, png path) of one tiny run."""
    out = tmp_path_factory.mktemp("bench")
    bench_ops.main(TINY + ["--out", str(out)])
    name = bench_ops.device_name(torch.device("cpu"))
    return (out / f"{name}.md").read_text(), json.loads((out / f"{name}.json").read_text()), out / f"{name}-scaling.png"


def table_rows(md, title):
    """The body rows of the table under `### title`, as lists of cells."""
    section = md.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_main_case_is_the_training_default(bench_ops):
    options = bench_ops.strategy_options(bench_ops.MAIN)
    config = SamplerConfig()
    assert options == {k: getattr(config, k) for k in options}
    assert (options["neg_strategy"], options["pos_strategy"], options["pos_weight"]) == ("soft", "soft", 2.0)


def test_soft_uniform_row_is_the_old_main_case(bench_ops):
    # Before issue 19 the main case was the op's defaults plus these: its row must stay the same case.
    defaults = {k: p.default for k, p in inspect.signature(overlap_sampler.sample).parameters.items()}
    old = {**defaults, **dict(batch_size_per_image=512, positive_fraction=0.25, neg_strategy="soft", num_bins=2)}
    options = bench_ops.strategy_options("soft / uniform")
    assert options == {k: old[k] for k in options}


def test_markdown_names_the_main_case_and_has_every_table(bench_ops, run):
    md, _, png = run
    assert "**Main case: soft / soft, ε=2 (training default)**" in md
    assert table_rows(md, "main") and table_rows(md, "main")[0][:3] == ["2", "300", "10"]
    strategies = table_rows(md, "strategies (B=2, N=300, G=10)")
    assert [r[0] for r in strategies] == list(bench_ops.STRATEGIES)
    assert {"soft / uniform", "uniform / uniform", "hard / uniform", "linear / uniform"} <= set(bench_ops.STRATEGIES)
    assert [r[:3] for r in table_rows(md, "scaling in N (B=4, G=10)")] == [["4", "200", "10"], ["4", "400", "10"]]
    assert [r[:3] for r in table_rows(md, "scaling in B (N=300, G=10)")] == [["1", "300", "10"], ["2", "300", "10"]]
    memory = table_rows(md, "peak memory of one call in N (B=4, G=10)")
    assert [r[:3] for r in memory] == [["4", "200", "10"], ["4", "400", "10"]]
    assert all(re.fullmatch(r"\d+\.\d+", cell) for r in memory for cell in r[3:6])
    assert f"]({png.name})" in md


def test_plot_is_a_png(run):
    assert run[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_records_the_main_case_and_peak_memory(bench_ops, run):
    _, data, _ = run
    main = data["main case"]
    assert (main["strategies"], main["B"], main["N"], main["G"]) == (bench_ops.MAIN, 2, 300, 10)
    assert main["options"] == bench_ops.training_default_options()
    assert all(row["strategies"] == bench_ops.MAIN for row in data["sections"]["main"])
    memory = data["peak memory"]["rows"]
    assert [r["N"] for r in memory] == [200, 400]
    # The per-image way builds IoU matrices, the op fuses them away.
    assert all(r[bench_ops.REFERENCE] > r[bench_ops.OURS] >= 0 for r in memory)


def test_guard_reads_the_run(bench_ops, run, tmp_path, monkeypatch):
    # Its own results round-trip: same main case, measured at the recorded size.
    _, data, _ = run
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    sizes = []
    monkeypatch.setattr(bench_ops, "measure", lambda b, n, g, *a, **k: sizes.append((b, n, g)) or dict(
        data["sections"]["main"][0]))
    assert bench_ops.guard(path, torch.device("cpu"), 1, 0.25) == 0
    assert sizes == [(2, 300, 10)]
