"""`benchmarks.harness --recover`: a --point run stopped from outside leaves its measured rows, and they become the
point JSON the run would have written, with what was not measured marked so."""
import json
import os

import pytest

from benchmarks import harness
from benchmarks.runner import append_row


def _stopped_run(tmp_path, current):
    work = tmp_path / "run" / "_work"
    os.makedirs(work)
    pt = dict(B=2, T=64, H=1, K=16, V=16, dtype="bf16")
    tasks = [dict(key="machine", kind="machine")] + [
        dict(key=harness.point_key("point", f, m, "bf16", 2, 64, 1, 16, 16), kind="point", form=f, mode=m, **pt)
        for f in ("chunk", "fla.chunk") for m in ("fwd", "fwd+bwd")]
    with open(work / "point.job.json", "w") as f:
        json.dump(dict(name="point", tasks=tasks, config=dict(rep_ms=100)), f)
    append_row(str(work / "point.jsonl"), dict(tasks[0], status="ok", gpu="test GPU"))
    for t, ms in zip(tasks[1:3], (0.9, 2.5)):
        append_row(str(work / "point.jsonl"), dict(t, status="ok", ms=ms, tokens_per_s=128 / ms * 1e3, tflops=1.0,
                                                   gbps=100.0, first_call_ms=1e3))
    (work / "point.current").write_text(tasks[3]["key"] if current else "")
    return tmp_path / "run", tasks


@pytest.mark.parametrize("current", [True, False])
def test_recovered_point_keeps_measured_rows_and_marks_the_rest(tmp_path, monkeypatch, current):
    """Measured rows come back as they were; the running task is cut off (an error), later ones not measured;
    the commit is the one named, created the rows file's time, and the file says it was recovered."""
    run, tasks = _stopped_run(tmp_path, current)
    monkeypatch.setenv("DELTACHECK_COMMIT", "abc1234")
    os.utime(run / "_work" / "point.jsonl", (1_800_000_000, 1_800_000_000))
    path = harness.recover_point(str(run), str(tmp_path / "out"))
    doc = json.load(open(path))
    rows = {(r["form"], r["mode"]): r for r in doc["rows"]}
    assert [rows[("chunk", m)]["ms"] for m in ("fwd", "fwd+bwd")] == [0.9, 2.5]
    assert rows[("fla.chunk", "fwd")]["status"] == ("error" if current else "skipped")
    assert rows[("fla.chunk", "fwd+bwd")]["status"] == "skipped"
    assert doc["git"]["commit"] == "abc1234" and doc["created"].startswith("2027-01-15")
    assert "recover" in doc["recovered"] and doc["machine"]["gpu"] == "test GPU"
    assert os.path.basename(path) == "point-B2-T64-H1-K16-V16-bf16.json"


def test_recover_needs_the_runs_commit(tmp_path, monkeypatch):
    """Without DELTACHECK_COMMIT the checkout's commit would be recorded, which need not be the run's: refused."""
    run, _ = _stopped_run(tmp_path, True)
    monkeypatch.delenv("DELTACHECK_COMMIT", raising=False)
    with pytest.raises(SystemExit, match="DELTACHECK_COMMIT"):
        harness.recover_point(str(run))
