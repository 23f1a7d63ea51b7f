"""The HTML report builds from small fixture data (reports/fixtures/data/) and from no data at all: the page is
well-formed, self-contained (no http(s) source or link) and has every section; missing data reads "not measured
yet"; verification records map to the right op, form, feature, quantity and dtype."""
import html
import json
import math
import os
import re
import shutil
from html.parser import HTMLParser

import pytest

from reports import build as B

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "reports", "fixtures", "data")
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Checker(HTMLParser):
    """Tracks the open-element stack: every non-void element must close in order; collects headings and every
    src/href."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.urls, self.headings, self._h = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.urls.append(v)
        if tag in ("h1", "h2", "h3"):
            self._h = [tag, ""]
        if tag not in VOID:
            self.stack.append((tag, self.getpos()))

    def handle_startendtag(self, tag, attrs):
        for k, v in attrs:
            if k in ("src", "href") and v is not None:
                self.urls.append(v)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> at {self.getpos()} closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        if self._h and tag == self._h[0]:
            self.headings.append(self._h[1].strip())
            self._h = None

    def handle_data(self, data):
        if self._h:
            self._h[1] += data


def check_page(page):
    c = Checker()
    c.feed(page)
    c.close()
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed elements: {c.stack[:5]}"
    external = [u for u in c.urls if u.lower().startswith(("http:", "https:", "//"))]
    assert not external, f"the page must be self-contained, found {external[:3]}"
    local = [u[:60] for u in c.urls if not u.startswith(("#", "data:"))]
    assert not local, f"only in-page anchors and data URIs expected, found {local[:3]}"
    for _, title in B.SECTIONS:
        assert title in c.headings, f"section heading {title!r} missing; headings: {c.headings}"
    return c


def test_report_builds_from_fixture_data(tmp_path):
    """Every section renders from the fixture data: machines, both verification matrices (a failing and an
    infinite error included), tolerances, plots or a note, the peer table with its fla/ours ratios, decode, the
    performance goals with their ratios, roofline floors and cold first calls (also among the goals)."""
    out = tmp_path / "site" / "index.html"
    page = B.build(FIXTURES, str(out))
    assert out.read_text() == page
    check_page(page)
    for text in ("NVIDIA H100 80GB HBM3", "FAIL 1.7", "FAIL inf", "fla / ours", "SDPA / best ours", "1980 MHz",
                 "test_long_sequence_large_heads", "copy ceiling" if "data:image/png" in page else "decode",
                 "4 u = 0.0156", "CPU · fresh", "GPU · committed", "ours / fla", "roofline floor (ours at)",
                 "unsupported (dtype float32", "did not reach o at check(T=3)", "unsupported gradients: no backward",
                 "cold first calls, --point B=8", "timeout: over 240 s",
                 "dplr.chunk: fwd+bwd, fresh process, empty Triton cache, compile ahead on"):
        assert text in page, f"{text!r} not in the page"
    assert page.count(B.NOT_MEASURED) == 0, "fixture data covers every section"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "install matplotlib" in page
    else:
        # error vs T (GPU, CPU), throughput, TFLOP/s, memory, roofline, decode
        assert page.count("data:image/png;base64,") >= 7


def test_report_says_not_measured_yet_without_data(tmp_path):
    """With an empty data folder the report still builds, and each data section says so."""
    data = tmp_path / "data"
    data.mkdir()
    page = B.build(str(data), str(tmp_path / "index.html"))
    check_page(page)
    for sid, title in B.SECTIONS:
        if sid in ("tolerances", "machines", "sources"):
            continue
        start = page.index(f'<section id="{sid}">')
        end = page.index("</section>", start)
        assert B.NOT_MEASURED in page[start:end], f"section {title!r} should say '{B.NOT_MEASURED}'"


def test_report_builds_with_only_cpu_data(tmp_path):
    """CPU data present, GPU absent: the CPU matrix shows, every GPU section says not measured yet."""
    data = tmp_path / "data"
    data.mkdir()
    for f in ("verification-cpu.json", "verification-cpu.junit.xml", "accuracy-cpu.json"):
        shutil.copy(os.path.join(FIXTURES, f), data / f)
    page = B.build(str(data), None)
    check_page(page)
    assert "FAIL 1.7" in page and "GPU verification: not measured yet" in page
    assert "GPU throughput: not measured yet" in page


@pytest.mark.parametrize("rec, expect", [
    (dict(test="properties/test_fused_recurrent_delta_rule.py::test_fused_recurrent_gradients_match_reference",
          name="dq", err=1e-6, bound=2048 * 2.0 ** -24),
     dict(op="delta_rule", form="fused_recurrent", feature="gradients match reference", quantity="dq",
          dtype="float32")),
    (dict(test="properties/test_chunk_delta_rule.py::test_chunk_size_invariance", name="o C=32 vs 16", err=0.0,
          bound=8 * 2.0 ** -11),
     dict(op="delta_rule", form="chunk", feature="size invariance", quantity="o", dtype="float16")),
    # fp16's gradient bound equals bf16's forward bound (2^-6): the quantity's kind decides
    (dict(test="properties/test_chunk_delta_rule.py::test_chunk_gradients_match_reference", name="dbeta",
          err=0.0, bound=2.0 ** -6), dict(dtype="float16")),
    (dict(test="properties/test_chunk_delta_rule.py::test_chunk_matches_recurrent_reference", name="o", err=0.0,
          bound=2.0 ** -6), dict(dtype="bfloat16")),
    (dict(test="properties/test_delta_rule_forms_agree.py::test_chunk_equals_recurrent_equals_parallel",
          name="chunk.final_state", err=1e-9, bound=1e-8, dtype="torch.float64"),
     dict(op="delta_rule", form="chunk", quantity="final_state", dtype="float64")),
    (dict(test="properties/test_l2norm.py::test_l2norm_matches_reference", name="l2norm.dx", err=None, bound=1.0),
     dict(op="l2norm", form="-", quantity="dx", err=math.inf)),
])
def test_verification_records_parse(rec, expect):
    """A record's test id, name and fields give its matrix coordinates and dtype."""
    got = B.parse_record(rec)
    for k, v in expect.items():
        assert got[k] == v, (k, got)


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="properties.test_conformance" name="test_state_splits_at_any_t[peer.x-fp16]" time="1"/>
<testcase classname="properties.test_conformance" name="test_state_splits_at_any_t[peer.x-fp32]" time="1">
<failure message="torch.AcceleratorError: CUDA error: an illegal memory access was encountered">
E   Failing test case: check(
E       T=2,
E       seed=0,
E   )</failure></testcase>
<testcase classname="properties.test_other" name="test_state_splits_at_any_t[peer.x-fp64]" time="1"/>
<testcase time="300"/>
</testsuite></testsuites>"""


def test_conformance_cells_report_failures_without_records_and_cases_not_run(tmp_path):
    """A case whose test failed before recording an error is FAIL with its exception and hypothesis's failing
    input; a collected case that never reported is 'not run' (never a pass), also when it was cut off after
    checks that passed; other modules' tests stay out."""
    junit = tmp_path / "c.junit.xml"
    junit.write_text(JUNIT)
    rec = dict(test="properties/test_conformance.py::test_state_splits_at_any_t[peer.x-fp16]", impl="peer.x",
               prop="state_splits_at_any_t", name="o", err=1e-4, bound=1e-3, status="pass", dtype="torch.float16")
    ids = [f"properties/test_conformance.py::test_state_splits_at_any_t[peer.x-{d}]" for d in ("fp16", "fp32",
                                                                                                "bf16")]
    cut = dict(rec, test=ids[2], dtype="torch.bfloat16")  # recorded, then stopped by the time limit
    doc = dict(meta=dict(collected=ids), records=[rec, cut])
    props, impls, dtypes, cells = B.conformance_cells(doc, str(junit))
    assert (props, impls, dtypes) == (["state_splits_at_any_t"], ["peer.x"], ["fp16", "bf16", "fp32"])
    got = {d: cells[("state_splits_at_any_t", "peer.x", d)] for d in dtypes}
    assert got["fp16"]["status"] == "pass" and math.isclose(got["fp16"]["ratio"], 0.1)
    assert got["fp32"]["status"] == "fail" and "illegal memory access" in got["fp32"]["error"]
    assert got["fp32"]["example"] == "check(T=2, seed=0)"
    assert got["bf16"]["status"] == "not run" and got["bf16"]["reason"] == "cut off after 1 checks within their bounds"
    page = B.conformance_html(doc, str(junit), "run")
    assert "not run" in page and "FAIL" in page and "1 pass, 1 fail, 1 not run" in page


def test_merged_runs_keep_their_labels_and_name_the_tests_never_reported(tmp_path):
    """merge-runs of an earlier merge and a new run keeps every run with its own label (records too), and the
    test outcomes name the collected tests that no run reported, instead of counting nameless cut-offs, and say
    that a test two runs reported is counted once per run."""
    from benchmarks.gpu_summary import merge_runs
    ids = ["properties/test_conformance.py::test_state_splits_at_any_t[peer.x-" + d + "]"
           for d in ("fp16", "fp32", "bf16")]
    for name, commit, collected, test in [("a", "a1", ids, ids[0]), ("b", "b2", ids[1:], ids[1])]:
        meta, recs = dict(commit=commit, collected=collected), [dict(test=test, name="o", err=0, bound=1)]
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(meta=meta, records=recs)))
        (tmp_path / f"{name}.junit.xml").write_text(JUNIT)
    merge_runs(str(tmp_path / "ab"), [("a", str(tmp_path / "a")), ("b", str(tmp_path / "b"))])
    (tmp_path / "c.json").write_text(json.dumps(dict(meta=dict(commit="c3"), records=[])))
    merge_runs(str(tmp_path / "abc"), [("ignored", str(tmp_path / "ab")), ("c", str(tmp_path / "c"))])
    doc = json.loads((tmp_path / "abc.json").read_text())
    assert [r["label"] for r in doc["meta"]["runs"]] == ["a", "b", "c"]
    assert [r["run"] for r in doc["records"]] == ["a", "b"]
    page = B.junit_html(str(tmp_path / "abc.junit.xml"), "run", B.collected_ids(doc["meta"]))
    assert "1 of 3 collected tests never reported" in page and "peer.x-bf16" in page
    # the two runs reported the same tests: the outcomes say they are counted per run
    assert re.search(r"\d+ reports of \d+ distinct tests", page), page


def test_merged_forms_replace_only_the_forms_remeasured(tmp_path):
    """merge-forms of a sweep that measured forms x and y into one of x and z keeps z's rows, takes x and y from
    the new file, and merged_from says (newest first) which commit measured which form; a commit left with no
    form is dropped."""
    from benchmarks.gpu_summary import merge_forms
    def sweep(commit, forms, ms):
        return dict(git=dict(commit=commit), created=commit, sweep=[dict(form=f, ms=ms) for f in forms],
                    decode=[dict(form=f, ms=ms) for f in forms if f != "z"], forms={f: {} for f in forms})
    (tmp_path / "old.json").write_text(json.dumps(dict(sweep("c1", ["x", "z"], 1.0), merged_from=[
        dict(commit="c1", forms=["x"], note=""), dict(commit="c0", forms=["z"], note="old z")])))
    (tmp_path / "new.json").write_text(json.dumps(sweep("c2", ["x", "y"], 2.0)))
    merge_forms(str(tmp_path / "old.json"), str(tmp_path / "new.json"), note="switch on")
    doc = json.loads((tmp_path / "old.json").read_text())
    assert sorted((r["form"], r["ms"]) for r in doc["sweep"]) == [("x", 2.0), ("y", 2.0), ("z", 1.0)]
    assert sorted(r["form"] for r in doc["decode"]) == ["x", "y"]
    assert [(m["commit"], m["forms"], m["note"]) for m in doc["merged_from"]] == [
        ("c2", ["x", "y"], "switch on"), ("c0", ["z"], "old z")]
    assert set(doc["forms"]) == {"x", "y", "z"} and doc["git"]["commit"] == "c2"


def test_fixture_data_is_what_make_writes(tmp_path, monkeypatch):
    """reports/fixtures/data/ is exactly what `python3 -m reports.fixtures.make` writes: no hand edit that a
    regeneration would lose."""
    from reports.fixtures import make as M
    monkeypatch.setattr(M, "HERE", str(tmp_path))
    monkeypatch.setattr(M, "GPU", str(tmp_path / "h100-80gb-hbm3"))
    M.main()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(os.path.relpath(os.path.join(d, f), FIXTURES) for d, _, fs in os.walk(FIXTURES) for f in fs)
    assert written == committed
    for rel in written:
        assert (tmp_path / rel).read_bytes() == open(os.path.join(FIXTURES, rel), "rb").read(), rel


def _goal_point(created, commit, rows):
    """A harness --point document at the goals' point shape with rows (form, mode, ms)."""
    return dict(kind="point", created=created, git=dict(commit=commit),
                rows=[dict(form=f, mode=m, ms=ms, B=8, T=4096, status="ok", **B.GOAL_SHAPE) for f, m, ms in rows])


def test_goals_take_the_newest_run_that_has_both_forms():
    """A goal's ratio comes from the newest run that timed ours and fla together, not from an older one listed
    first; a still newer run without fla shows in the 'later run' column, and no ratio mixes two runs."""
    old = _goal_point("2026-01-01T00:00:00", "aaaaaaa", [("chunk", "fwd", 3.0), ("fla.chunk", "fwd", 1.5)])
    new = _goal_point("2026-02-01T00:00:00", "bbbbbbb", [("chunk", "fwd", 1.0), ("fla.chunk", "fwd", 1.25)])
    alone = _goal_point("2026-03-01T00:00:00", "ccccccc", [("chunk", "fwd", 0.9)])
    text = re.sub(r"<[^>]+>", "|", B.goals_html(None, [old, alone, new]))
    row = text[text.index("|chunk||fwd||B=8, T=4096|"):text.index("|chunk||fwd+bwd||")]
    assert "|1||1.25||0.8||0.8|" in row, row  # ours, fla, ratio 1.0 / 1.25 and goal: bbbbbbb's pair
    assert "|met|" in row and "0.9 at ccccccc" in row and "|3|" not in row, row


def test_goal_fresh_process_first_calls_judge_each_forms_newest_run():
    """benchmarks/first_call.py's fresh-process rows judge the first-call goal from each form's newest run (per
    compile-ahead setting and point), name its commit, and drop the older runs of the same form."""
    def fresh(created, commit, rows):
        return ("f.json", dict(kind="first_call", created=created, git=dict(commit=commit), point=dict(B=8, T=4096),
                               rows=[dict(form=f, mode="fwd+bwd", ahead=1, status="ok", first_s=s) for f, s in rows]))
    old = fresh("2026-01-01T00:00:00", "aaaaaaa", [("chunk", 7.0), ("dplr.chunk", 11.2)])
    new = fresh("2026-02-01T00:00:00", "bbbbbbb", [("dplr.chunk", 9.8)])
    text = html.unescape(re.sub(r"<[^>]+>", "|", B.goals_html(None, [_goal_point("2026-01-01T00:00:00", "ccccccc", [
        ("chunk", "fwd", 1.0)])], cold_calls=[new, old])))
    rows = text[text.index("first call, fwd then fwd+bwd"):]
    assert "dplr.chunk: fwd+bwd, fresh process, empty Triton cache, compile ahead on (the default), at bbbbbbb" in rows
    assert "|9.8|" in rows and "|11.2|" not in rows, rows
    assert "chunk: fwd+bwd, fresh process, empty Triton cache, compile ahead on (the default), at aaaaaaa" in rows
    assert "|7|" in rows and rows.count("|met|") == 2 and "|missed|" not in rows, rows


def test_goal_first_calls_take_each_forms_newest_run_without_a_verdict():
    """The goals' first-call rows from benchmark runs take each form's newest run (not the first file listed),
    name its commit, and give no met / missed: such a run's Triton cache state is not recorded, so only
    benchmarks/first_call.py's fresh-process, empty-cache rows judge the goal."""
    def cold(created, commit, fwd_s, bwd_s):
        d = _goal_point(created, commit, [("chunk", "fwd", 1.0), ("chunk", "fwd+bwd", 3.0)])
        for r, s in zip(d["rows"], (fwd_s, bwd_s)):
            r.update(cold=True, first_call_ms=s * 1e3)
        return d
    old, new = cold("2026-01-01T00:00:00", "aaaaaaa", 9.0, 11.0), cold("2026-02-01T00:00:00", "bbbbbbb", 2.0, 3.0)
    text = html.unescape(re.sub(r"<[^>]+>", "|", B.goals_html(None, [old, new])))
    rows = text[text.index("first call, fwd then fwd+bwd"):]
    assert "benchmark run at bbbbbbb" in rows and "|5|" in rows, rows
    assert "aaaaaaa" not in rows and "|20|" not in rows, rows
    assert "not the goal's measure" in rows and "|met|" not in rows and "|missed|" not in rows, rows


def test_accuracy_goal_prefers_one_run_and_names_a_borrowed_one():
    """The accuracy goal compares ours with fla from the run that measured both; with none, it borrows fla's
    errors only from a run on the same seeded inputs (any GPU) and names it; ours above fla in o or the worst
    gradient is 'missed', and every quantity where ours is larger is listed."""
    def doc(created, commit, entries, seed=0, T=1024):
        return dict(kind="point", created=created, git=dict(commit=commit), config=dict(seed=seed), rows=[],
                    accuracy=[dict(form=f, status="ok", dtype="bf16", B_compared=8, T_measured=T, H=16, K=128, V=128,
                                   errors=e) for f, e in entries])
    e = lambda o, dq, dk: dict(o=o, dq=dq, dk=dk)  # noqa: E731
    same = doc("2026-01-01", "aaaaaaa", [("dplr.chunk", e(2e-3, 3e-3, 1e-3)), ("fla.dplr.chunk", e(3e-3, 4e-3, 5e-4))])
    text = html.unescape(re.sub(r"<[^>]+>", "|", B.accuracy_goals_html([same])))
    assert "||dk 2.000x||met (fla: the same run)||" in text, text
    alone = doc("2026-02-01", "bbbbbbb", [("chunk", e(5e-3, 6e-3, 1e-3))])
    other_seed = doc("2026-03-01", "ccccccc", [("fla.chunk", e(1e-3, 1e-3, 1e-3))], seed=1)
    other_T = doc("2026-03-01", "ddddddd", [("fla.chunk", e(1e-3, 1e-3, 1e-3))], T=4096)
    text = html.unescape(re.sub(r"<[^>]+>", "|", B.accuracy_goals_html([alone], [("GPU X", other_seed),
                                                                                  ("GPU X", other_T)])))
    assert "fla not measured on these inputs" in text and "missed" not in text, text
    borrowed = doc("2026-01-15", "eeeeeee", [("fla.chunk", e(4e-3, 7e-3, 1e-3))])
    text = html.unescape(re.sub(r"<[^>]+>", "|", B.accuracy_goals_html([alone], [("GPU X", borrowed)])))
    assert "||o 1.250x||missed (fla: GPU X at eeeeeee (another run, same seeded inputs))||" in text, text
