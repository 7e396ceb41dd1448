"""The study's runner: a smoke run writing every output, the results schema, determinism, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from paramshare.study import EXPERIMENTS, StudyError, run_study
from paramshare.study.jobs import job, run_jobs
from paramshare.study.progress import Progress

SMOKE_STEPS = 12
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    result = run_study(out, steps=SMOKE_STEPS, workers=1)
    return out, result


def _no_nan(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"results.json holds {name}")

    return json.loads(text, parse_constant=refuse)


def check_results_schema(doc: dict, out: Path) -> None:
    """Fail unless ``doc`` is a valid results.json for the folder ``out``."""
    assert doc["format"] == "paramshare.study" and doc["version"] == 1
    for k in ("paramshare", "torch", "python"):
        assert isinstance(doc[k], str) and doc[k]
    c = doc["config"]
    assert isinstance(c["quick"], bool) and isinstance(c["seed"], int) and c["data"] in ("mnist1d", "digits", "mnist")
    assert c["steps_override"] is None or isinstance(c["steps_override"], int)
    assert isinstance(c["workers"], int) and c["workers"] >= 1 and c["published_steps"] == 6000
    assert c["experiments"] and set(c["experiments"]) <= set(EXPERIMENTS)
    d = doc["dataset"]
    assert {"name", "title", "description", "train", "test", "channels", "length", "classes"} <= set(d)
    assert d["train"] > 0 and d["test"] > 0 and d["classes"] == 10
    assert set(doc["experiments"]) == set(c["experiments"])
    files = doc["files"]
    assert files[:2] == ["report.md", "results.json"] and len(set(files)) == len(files)
    for name in files:
        assert (out / name).is_file(), name
    for name, s in doc["experiments"].items():
        assert isinstance(s["title"], str) and s["title"] and isinstance(s["question"], str)
        assert isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0 and isinstance(s["skipped"], str)
        if s["skipped"]:
            continue
        assert s["rows"] and s["columns"] and s["findings"] and all(isinstance(f, str) for f in s["findings"])
        keys = [col["key"] for col in s["columns"]]
        assert all(set(col) == {"key", "header", "fmt"} for col in s["columns"])
        for row in s["rows"]:
            assert set(keys) <= set(row), (name, set(keys) - set(row))
        for fig in s["figures"]:
            assert fig.endswith(".png") and fig in files
    assert doc["runs"]
    for run in doc["runs"]:
        assert set(run) == {"fn", "args", "result"} and ":" in run["fn"]
        assert run["result"]["seconds"] >= 0
        for k in ("test_acc", "train_acc"):
            if k in run["result"]:
                assert 0.0 <= run["result"][k] <= 1.0
    assert doc["wall_seconds"] > 0


def test_smoke_run_writes_every_output(smoke):
    out, result = smoke
    doc = _no_nan((out / "results.json").read_text())
    check_results_schema(doc, out)
    assert doc == result.results
    assert doc["config"]["steps_override"] == SMOKE_STEPS and list(doc["experiments"]) == list(EXPERIMENTS)
    pngs = [f for f in doc["files"] if f.endswith(".png")]
    assert len(pngs) >= 5
    for f in pngs:
        data = (out / f).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000  # a drawn plot, not an empty canvas
    report = (out / "report.md").read_text()
    for s in result.sections:
        assert s.title in report
    for f in pngs:
        assert f"]({f})" in report
    assert "smoke run" in report
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    # the baselines' published numbers sit next to the measured ones
    rows = {r["model"]: r for r in doc["experiments"]["baselines"]["rows"]}
    assert rows["CNN"]["published_acc"] == 0.94 and rows["MLP"]["published_acc"] == 0.68
    assert rows["CNN"]["steps"] == SMOKE_STEPS and rows["CNN"]["stored_params"] == 5210


def test_summary_is_a_readable_table(smoke):
    _, result = smoke
    text = result.summary()
    assert text.startswith("paramshare study on mnist1d (4000 train / 1000 test)")
    assert f"step budget scaled to {SMOKE_STEPS} baseline steps" in text
    for i, s in enumerate(result.sections, 1):
        assert f"{i}. {s.title}" in text
    assert "published" in text and "measured test acc" in text and "Wrote report.md, results.json and" in text


def test_results_schema_check_rejects_a_broken_document(smoke):
    out, result = smoke
    doc = json.loads(json.dumps(result.results))
    del doc["experiments"]["spatial"]["rows"][0]["test_acc"]
    with pytest.raises(AssertionError):
        check_results_schema(doc, out)
    doc = json.loads(json.dumps(result.results))
    doc["files"].append("missing.png")
    with pytest.raises(AssertionError):
        check_results_schema(doc, out)


@pytest.mark.slow
def test_same_seed_same_numbers_in_worker_processes(smoke, tmp_path):
    """Runs are seeded by their own arguments: two worker processes reproduce the serial run."""
    _, serial = smoke
    names = ["spatial"]
    par = run_study(tmp_path / "par", steps=SMOKE_STEPS, workers=2, experiments=names)

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert par.results["config"]["workers"] == 2
    for n in names:
        assert strip(par.results["experiments"][n]["rows"]) == strip(serial.results["experiments"][n]["rows"])
    # ... and another seed gives other numbers
    from paramshare.study.data import load_dataset

    runs = [job("paramshare.study.train:train_classifier", 1, model="cnn", steps=SMOKE_STEPS, seed=s) for s in (0, 1)]
    res = run_jobs(runs, load_dataset("mnist1d"))
    assert res[runs[0].key]["test_acc"] == serial.results["experiments"]["baselines"]["rows"][2]["test_acc"]
    assert res[runs[1].key]["final_loss"] != res[runs[0].key]["final_loss"]


def test_out_folder_rules(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(StudyError, match="is not empty .* pass --force"):
        run_study(busy, steps=2, experiments=["baselines"])
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StudyError, match="is a file, not a folder"):
        run_study(a_file, steps=2, force=True)
    with pytest.raises(StudyError, match="unknown experiments \\['nope'\\]"):
        run_study(tmp_path / "new", experiments=["nope"])
    with pytest.raises(StudyError, match="unknown dataset 'cifar'"):
        run_study(tmp_path / "new", data="cifar")
    with pytest.raises(StudyError, match="steps must be a positive integer"):
        run_study(tmp_path / "new", steps=0)
    assert not (tmp_path / "new").exists()  # nothing created for a refused run


def test_force_replaces_a_previous_study_and_keeps_other_files(tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    stale = "old_plot.png"
    (out / stale).write_bytes(PNG)
    (out / "results.json").write_text(json.dumps({"files": ["results.json", "report.md", stale, "../outside.txt"]}))
    (tmp_path / "outside.txt").write_text("keep")
    run_study(out, steps=2, experiments=["baselines"], force=True, workers=1)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["baselines.png", "notes.txt", "report.md", "results.json"]
    assert (tmp_path / "outside.txt").read_text() == "keep"


def test_jobs_are_deduplicated_and_failures_named():
    calls = []
    a = job("tests_helpers:f", cost=1, x=1)
    b = job("tests_helpers:f", cost=5, x=1)
    assert a.key == b.key and a.key != job("tests_helpers:f", cost=1, x=2).key
    sys.modules.setdefault("tests_helpers", type(sys)("tests_helpers"))
    sys.modules["tests_helpers"].f = lambda data, x: calls.append(x) or {"x": x, "seconds": 0.0}
    assert run_jobs([a, b], data=None) == {a.key: {"x": 1, "seconds": 0.0}} and calls == [1]
    sys.modules["tests_helpers"].g = lambda data: 1 / 0
    with pytest.raises(StudyError, match="study run boom failed: ZeroDivisionError"):
        run_jobs([job("tests_helpers:g", cost=1, label="boom")], data=None)


def test_progress_bar_draws_only_when_enabled():
    import io

    stream = io.StringIO()
    with Progress(True, stream=stream) as bar:
        bar.add(10, runs=2)
        bar.advance(5, label="cnn")
        line = bar.line()
    assert "50%" in line and "1/2 runs" in line and "cnn" in line
    assert "\r" in stream.getvalue() and "50%" in stream.getvalue()
    quiet = io.StringIO()
    with Progress(False, stream=quiet) as bar:
        bar.add(10, runs=1)
        bar.advance(10)
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_cli_prints_a_summary_without_a_bar_when_not_a_terminal(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "paramshare.cli", "study", "--only", "baselines", "--steps", "3", "--out", "o",
         "--workers", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert p.returncode == 0, p.stderr
    assert "1. Baselines: published vs measured" in p.stdout and "Wrote report.md" in p.stdout
    assert "\r" not in p.stderr and "study [" not in p.stderr
    assert (tmp_path / "o" / "baselines.png").is_file()


def test_cli_refuses_a_busy_folder_and_is_silent_with_quiet(tmp_path, capsys, monkeypatch):
    from paramshare.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(["study", "--out", "o", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err
    assert main(["study", "--only", "baselines", "--steps", "2", "--out", "o", "--force", "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_default_out_is_the_ignored_folder():
    from paramshare.study import DEFAULT_OUT

    root = Path(__file__).resolve().parents[2]
    assert f"/{DEFAULT_OUT}/" in (root / ".gitignore").read_text().split()
