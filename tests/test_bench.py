"""``visrep bench``: recipes at one budget in child processes, one table with the label-seeing rows apart,
finished runs reused."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # two child processes, each pretraining + evaluating (about 50 s on 2 busy cores)
@pytest.mark.timeout(600)
def test_bench_runs_each_recipe_once_marks_labels_and_resumes(tmp_path, monkeypatch):
    import subprocess

    from visrep.bench import bench, cpu_recipes, saw_labels

    assert "msn/fashion_mnist" in cpu_recipes() and "dinov2/fashion_mnist_distill" not in cpu_recipes()
    assert saw_labels("paws/fashion_mnist") and saw_labels("clip/fashion_mnist") and not saw_labels("msn/tiny")
    out = tmp_path / "bench"
    records = bench(["msn/tiny", "paws/tiny"], steps=2, out_dir=str(out),
                    overrides=["eval.lowshot_seeds=1", "eval.linear_epochs=2"])
    assert [r["train"]["step"] for r in records] == [2, 2]
    assert all(r["peak_mb"] > 50 for r in records)
    table = (out / "bench.md").read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| msn/tiny |") and lines[2].startswith("| paws/tiny (saw labels) |")
    assert lines[3].startswith("| raw pixels |")
    assert json.loads((out / "bench.json").read_text())[1]["saw_labels"] == "PAWS's labelled supports"

    def no_child(*a, **kw):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    again = bench(["msn/tiny", "paws/tiny"], steps=2, out_dir=str(out))
    assert [r["results"] for r in again] == [r["results"] for r in records]
    with pytest.raises(ValueError, match="exactly one budget"):
        bench(["msn/tiny"], out_dir=str(out))
