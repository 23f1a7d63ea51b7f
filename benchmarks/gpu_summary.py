"""The machine record and the compact end-of-run summary of benchmarks/gpu_session.sh.

    python3 -m benchmarks.gpu_summary machine --out OUT            # OUT/machine.json, printed in a few lines
    python3 -m benchmarks.gpu_summary merge --out OUT            # fold xdist workers' record parts in
    python3 -m benchmarks.gpu_summary tests --out OUT [--timed-out S] [--rc N]
    python3 -m benchmarks.gpu_summary bench --data reports/data/<gpu>
    python3 -m benchmarks.gpu_summary merge-runs --into PREFIX --run LABEL=PREFIX1 --run LABEL=PREFIX2 ...
    python3 -m benchmarks.gpu_summary merge-forms --into DATA/bench.json --new NEW/bench.json [--note "..."]

A device call returns only the last 12,000 characters of its output, so everything a reply needs is printed
here, short: the machine, the pytest outcome with every failed test (one line each, first 30), the records over
their bounds, the point table (time, TFLOP/s, peak memory and error vs float64 of every form), and how far the
sweep and the accuracy sweep got. Reads the files the session wrote; imports torch only for `machine`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

MAX_FAILED = 30


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _short(text, n):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------------------------

SMI_FIELDS = ["name", "driver_version", "memory.total", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "temperature.gpu", "pstate"]


def machine_record() -> dict:
    """nvidia-smi's query, torch / triton / fla versions, the GPU torch sees, and the code's commit
    (DELTACHECK_COMMIT, else git)."""
    rec = {}
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        rec["nvidia_smi"] = ([dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
                              for line in out.stdout.strip().splitlines()] if out.returncode == 0
                             else {"error": _short(out.stderr, 200)})
    except Exception as e:
        rec["nvidia_smi"] = {"error": f"{type(e).__name__}: {e}"}
    from importlib import metadata
    for dist in ("torch", "triton", "fla-core", "flash-linear-attention", "hypothesis", "pytest", "pytest-xdist",
                 "einops", "flash-attn"):
        try:
            rec[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            rec[dist] = None
    try:
        import torch
        rec["torch"] = torch.__version__
        rec["cuda"] = torch.version.cuda
        rec["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            rec.update(gpu=p.name, sm_count=p.multi_processor_count,
                       total_memory_gib=round(p.total_memory / 2 ** 30, 1),
                       compute_capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count())
    except Exception as e:
        rec["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        import fla
        rec["fla_module"] = os.path.dirname(fla.__file__)
    except Exception as e:
        rec["fla_module"] = f"not importable: {type(e).__name__}: {_short(e, 160)}"
    commit = os.environ.get("DELTACHECK_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip() or None
        except Exception:
            commit = None
    rec["commit"] = commit or "unknown"
    try:
        from ops.common.utils import switches
        rec["switches"] = switches()
    except Exception as e:
        rec["switches"] = f"not importable: {type(e).__name__}: {_short(e, 160)}"
    rec["python"] = sys.version.split()[0]
    rec["cpu_count"] = os.cpu_count()
    return rec


def machine_lines(rec) -> list:
    smi = rec.get("nvidia_smi")
    lines = []
    if isinstance(smi, list):
        for g in smi:
            lines.append(f"gpu: {g.get('name')}, driver {g.get('driver_version')}, {g.get('memory.total')}, SM clock "
                         f"{g.get('clocks.sm')} / max {g.get('clocks.max.sm')}, mem clock {g.get('clocks.mem')}, "
                         f"power limit {g.get('power.limit')}, {g.get('temperature.gpu')} C, {g.get('pstate')}")
    else:
        lines.append(f"nvidia-smi: {smi.get('error') if isinstance(smi, dict) else smi}")
    lines.append(f"torch {rec.get('torch')} (CUDA {rec.get('cuda')}, available {rec.get('cuda_available')}"
                 + (f", {rec.get('gpu')}, {rec.get('sm_count')} SMs, {rec.get('total_memory_gib')} GiB"
                    if rec.get("gpu") else "") + f"), triton {rec.get('triton')}, python {rec.get('python')}, "
                 f"{rec.get('cpu_count')} CPUs")
    lines.append(f"fla-core {rec.get('fla-core')} ({rec.get('fla_module')}), flash-attn {rec.get('flash-attn')}, "
                 f"pytest {rec.get('pytest')}, xdist {rec.get('pytest-xdist')}, hypothesis {rec.get('hypothesis')}")
    sw = rec.get("switches")
    lines.append(f"commit {rec.get('commit')}; switches: "
                 + (", ".join(f"{k}={v}" for k, v in sw.items()) or "none (the defaults)" if isinstance(sw, dict)
                    else str(sw)))
    return lines


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------

def merge_records(path) -> int:
    """Fold PATH.gw* record parts left by xdist workers (a run stopped by its time limit can end before the
    controller merged them) into PATH. Returns the number of parts merged."""
    parts = sorted(glob.glob(glob.escape(path) + ".gw*"))
    if not parts:
        return 0
    doc = _load(path) or dict(meta={}, records=[])
    for p in parts:
        part = _load(p)
        if part:
            doc["records"].extend(part.get("records", []))
            for k, v in part.get("meta", {}).items():
                doc["meta"].setdefault(k, v)
        os.remove(p)
    doc["meta"]["merged_worker_parts"] = doc["meta"].get("merged_worker_parts", 0) + len(parts)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return len(parts)


def merge_runs(into, runs) -> str:
    """One record file and one junit file (INTO.json, INTO.junit.xml) from several runs of the same tests
    (RUN.json + RUN.junit.xml each; e.g. a conformance run cut off by a device call's time limit, then a call
    that ran the cases it did not reach). Each record and test case keeps its run's label; meta.runs lists the
    runs in order. Nothing is dropped: a case run twice appears twice (a failure in either run is a failure).
    A run that is itself a merge (its meta has runs) adds its runs as they are, with their own labels."""
    doc = dict(meta=dict(runs=[]), records=[])
    root = ET.Element("testsuites")
    for label, prefix in runs:
        part = _load(prefix + ".json") or dict(meta={}, records=[])
        meta = part.get("meta", {})
        merged = bool(meta.get("runs"))
        if merged:
            doc["meta"]["runs"] += meta["runs"]
            doc["records"] += part.get("records", [])
        else:
            doc["meta"]["runs"].append(dict(label=label, note=meta.get("note", ""), meta=meta,
                                            records=len(part.get("records", []))))
            doc["records"] += [dict(r, run=label) for r in part.get("records", [])]
        for k, v in meta.items():
            if k != "runs":
                doc["meta"].setdefault(k, v)
        try:
            jroot = ET.parse(prefix + ".junit.xml").getroot()
        except (OSError, ET.ParseError):
            continue
        for suite in ([jroot] if jroot.tag == "testsuite" else list(jroot.iter("testsuite"))):
            if not merged:
                suite.set("name", f"{suite.get('name', 'pytest')} [{label}]")
            root.append(suite)
    doc["meta"].pop("exitstatus", None)
    with open(into + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    ET.ElementTree(root).write(into + ".junit.xml", encoding="utf-8", xml_declaration=True)
    cases = sum(1 for _ in root.iter("testcase"))
    return f"merged {len(runs)} runs into {into}.json ({len(doc['records'])} records) and .junit.xml ({cases} cases)"


def junit_nodeid(cls, name) -> str:
    """pytest's node id of a junit test case (classname properties.test_x, name test_y[id])."""
    return (cls.replace(".", "/") + ".py" if cls else "?") + "::" + name


def junit_cases(root):
    """(classname, name, outcome, message, text, seconds) of every testcase of a parsed pytest junit XML; outcome
    is passed, failed, error, skipped or cut_off (a test stopped by a time limit, which pytest-xdist writes
    nameless: never a pass); text is a failure's full text (traceback, hypothesis's falsifying example)."""
    for tc in root.iter("testcase"):
        try:
            seconds = float(tc.get("time", 0))
        except ValueError:
            seconds = 0.0
        if not tc.get("name"):
            yield None, None, "cut_off", "", "", seconds
            continue
        outcome, msg, text = "passed", "", ""
        for child in tc:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = child.text or ""
                msg = child.get("message") or text
                break
        yield tc.get("classname", ""), tc.get("name"), outcome, msg, text, seconds


def junit_outcomes(path):
    """(totals dict, [(test id, outcome, message)] for failures and errors) from a pytest junit XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    totals = dict(passed=0, failed=0, error=0, skipped=0, cut_off=0)
    bad = []
    time_s = 0.0
    for suite in root.iter("testsuite"):
        try:
            time_s += float(suite.get("time", 0))
        except ValueError:
            pass
    for cls, name, outcome, msg, _, _ in junit_cases(root):
        totals[outcome] += 1
        if outcome in ("failed", "error"):
            bad.append((junit_nodeid(cls, name), outcome, msg))
    totals["time_s"] = time_s
    return totals, bad


def pytest_summary_line(log_path):
    """pytest's last '== N passed, ... in S ==' line (or the last lines when it never printed one)."""
    try:
        with open(log_path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ["(no pytest log)"]
    pat = re.compile(r"\d+ (passed|failed|error|errors|skipped|deselected)|no tests ran|Interrupted")
    hits = [line for line in lines if pat.search(line) and line.strip().startswith(("=", "!"))]
    if hits:
        return hits[-2:]
    return [_short(line, 200) for line in lines[-3:]] or ["(empty pytest log)"]


def error_ratio(err, bound) -> float:
    """A measured error over its bound; an exact property (bound 0) is 0 when its error is 0, else inf."""
    if err is None:
        return float("inf")
    return err / bound if bound > 0 else (0.0 if err == 0 else float("inf"))


def records_over_bound(path):
    """(records, [(ratio, test, name, dtype)] over their bound, worst first)."""
    doc = _load(path)
    if not doc:
        return None, []
    over = []
    for r in doc.get("records", []):
        if r.get("status") == "unsupported":  # not a measurement
            continue
        ratio = error_ratio(r.get("err"), r.get("bound") or 0)
        if ratio > 1 or r.get("status") == "fail":
            over.append((ratio, r.get("test", "?"), r.get("name", "?"), str(r.get("dtype", "")).replace("torch.", "")))
    over.sort(key=lambda t: -t[0])
    return len(doc.get("records", [])), over


def tests_lines(out, rc=None, timed_out=None) -> list:
    merge_records(os.path.join(out, "verification-gpu.json"))
    merged = ((_load(os.path.join(out, "verification-gpu.json")) or {}).get("meta") or {}).get("merged_worker_parts")
    lines = []
    head = "tests: pytest exit code " + str(rc)
    if timed_out:
        head += f"; STOPPED by the time limit ({timed_out} s): partial results"
    if merged:
        head += f"; {merged} worker record parts merged after the run"
    lines.append(head)
    lines += ["  " + line.strip() for line in pytest_summary_line(os.path.join(out, "pytest.log"))]
    res = junit_outcomes(os.path.join(out, "junit.xml"))
    if res is None:
        lines.append("  junit.xml missing or unreadable (see pytest.log)")
        bad = []
        try:
            with open(os.path.join(out, "pytest.log"), errors="replace") as f:
                bad = [(m.group(2), m.group(1).lower(), m.group(3) or "")
                       for m in re.finditer(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", f.read(), re.M)]
        except OSError:
            pass
    else:
        totals, bad = res
        lines.append(f"  junit: {totals['passed']} passed, {totals['failed']} failed, {totals['error']} errors, "
                     f"{totals['skipped']} skipped, {totals['cut_off']} cut off by the time limit in "
                     f"{totals['time_s']:.0f} s")
    if bad:
        lines.append(f"  failed tests ({len(bad)}{'; first ' + str(MAX_FAILED) if len(bad) > MAX_FAILED else ''}):")
        for test, outcome, msg in bad[:MAX_FAILED]:
            test = test.replace("properties/", "")
            lines.append("   " + _short(f"{outcome.upper()} {test}: {msg.splitlines()[0] if msg else ''}", 190))
    n, over = records_over_bound(os.path.join(out, "verification-gpu.json"))
    if n is None:
        lines.append("  verification-gpu.json: no records")
    else:
        lines.append(f"  verification-gpu.json: {n} measured errors, {len(over)} over their bound"
                     + (" (worst first):" if over else ""))
        for ratio, test, name, dtype in over[:8]:
            lines.append("   " + _short(f"{ratio:.3g} x bound  {test.replace('properties/', '')} [{name}] {dtype}",
                                        170))
    return lines


# --------------------------------------------------------------------------------------------------------------
# Bench
# --------------------------------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def point_lines(doc) -> list:
    """One line per form: fwd and fwd+bwd ms, TFLOP/s, peak GiB (fwd+bwd), error of o and the worst gradient."""
    pt = doc.get("point", {})
    rows = doc.get("rows", [])
    acc = {r["form"]: r for r in doc.get("accuracy", [])}
    forms = list(dict.fromkeys([r["form"] for r in rows] + list(acc)))
    lines = [f"point {','.join(f'{k}={v}' for k, v in pt.items())}: ms (TFLOP/s), peak GiB, rel. error vs float64",
             f"{'form':<25}{'fwd ms':>15}{'fwd+bwd ms':>16}{'GiB':>6}{'o err':>9}{'grad err':>15}  note"]
    for f in forms:
        by = {r["mode"]: r for r in rows if r["form"] == f}
        cells, notes, why = [], [], {}
        for mode, w in (("fwd", 15), ("fwd+bwd", 16)):
            r = by.get(mode)
            if r and r.get("status") == "ok":
                cells.append(f"{r['ms']:.3f} ({r['tflops']:.0f})".rjust(w))
            else:
                cells.append("-".rjust(w))
                if r:
                    why.setdefault(f"{r.get('status')}: {r.get('reason', '')}", []).append(mode)
        notes += [f"{'+'.join(modes) if len(why) > 1 or modes == ['fwd+bwd'] else ''} {text}".strip()
                  for text, modes in why.items()]
        r = by.get("fwd+bwd") if (by.get("fwd+bwd") or {}).get("status") == "ok" else by.get("fwd")
        mem = (r or {}).get("mem_peak_bytes")
        cells.append(f"{mem / 2 ** 30:>6.2f}" if mem else f"{'-':>6}")
        a = acc.get(f)
        if a and a.get("status") == "ok":
            e = a["errors"]
            grads = {k: v for k, v in e.items() if k.startswith("d")}
            worst = max(grads, key=grads.get) if grads else None
            cells.append(f"{e['o']:>9.1e}")
            cells.append((f"{grads[worst]:.1e} {worst}" if worst else "-").rjust(15))
            if a.get("reason"):
                notes.append(a["reason"])
        else:
            cells += [f"{'-':>9}", f"{'-':>15}"]
            if a:
                notes.append(f"{a.get('status')}: {a.get('reason', '')}")
        lines.append(f"{f:<25}" + "".join(cells) + "  " + _short("; ".join(dict.fromkeys(notes)), 110))
    b = doc.get("accuracy") or []
    if b:
        ok = [r for r in b if r.get("status") == "ok"]
        if ok:
            lines.append(f"bounds {ok[0]['dtype']}: forward {ok[0]['bound_forward']:.2g}, gradient "
                         f"{ok[0]['bound_gradient']:.2g}; error measured at T <= each reference's limit")
    c = doc.get("ceilings") or {}
    if c:
        lines.append(f"ceilings: copy {_fmt(c.get('copy_gbps'), '.0f')} GB/s; matmul "
                     + ", ".join(f"{k} {v:.0f}" for k, v in (c.get("matmul_tflops") or {}).items()) + " TFLOP/s")
    return lines


def sweep_lines(doc) -> list:
    rows = doc.get("sweep", []) + doc.get("decode", [])
    n = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
    lines = [f"sweep + decode: {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors "
             f"(budget {doc.get('budget_s')} s); largest T measured per form (fwd+bwd, ms):"]
    cells = []
    for f in dict.fromkeys(r["form"] for r in doc.get("sweep", [])):
        ok = [r for r in doc["sweep"] if r["form"] == f and r.get("mode") == "fwd+bwd" and r.get("status") == "ok"]
        if ok:
            top = max(ok, key=lambda r: r["T"])
            cells.append(f"{f} T={top['T']} {top['ms']:.2f}")
        else:
            cells.append(f"{f} -")
    for i in range(0, len(cells), 4):
        lines.append("  " + "; ".join(cells[i:i + 4]))
    errs = [r for r in rows if r.get("status") == "error"]
    for r in errs[:5]:
        lines.append("  " + _short(f"error {r['form']} {r.get('mode')} T={r.get('T')}: {r.get('reason')}", 170))
    return lines


def accuracy_lines(doc) -> list:
    rows = doc.get("rows", [])
    cfg = doc.get("config", {})
    n = {s: sum(r.get("status") == s for r in rows) for s in ("ok", "skipped", "error")}
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    lines = [f"accuracy sweep (B={cfg.get('B')}, H={cfg.get('H')}, K={cfg.get('K')}, V={cfg.get('V')}): {n['ok']} ok, "
             f"{n['skipped']} skipped, {n['error']} errors; worst error/bound fwd grad @ largest T measured:",
             f"{'':<25}" + "".join(f"{d:>22}" for d in dtypes)]
    for f in dict.fromkeys(r["form"] for r in rows):
        cells = []
        for d in dtypes:
            ok = [r for r in rows if r["form"] == f and r["dtype"] == d and r.get("status") == "ok"]
            if not ok:
                cells.append(f"{'-':>22}")
                continue
            fw = max(v / r["bound_forward"] for r in ok for k, v in r["errors"].items() if not k.startswith("d"))
            gr = [v / r["bound_gradient"] for r in ok for k, v in r["errors"].items() if k.startswith("d")]
            T = max(r.get("T_measured", r["T"]) for r in ok)
            cells.append(f"{fw:.2g} {max(gr):.2g} @{T}".rjust(22) if gr else f"{fw:.2g} - @{T}".rjust(22))
        lines.append(f"{f:<25}" + "".join(cells))
    return lines


def bench_lines(data) -> list:
    lines = []
    for p in sorted(glob.glob(os.path.join(data, "point-*.json"))):
        doc = _load(p)
        if doc:
            lines += point_lines(doc)
    b = _load(os.path.join(data, "bench.json"))
    lines += sweep_lines(b) if b else ["sweep: no bench.json"]
    a = _load(os.path.join(data, "accuracy.json"))
    lines += accuracy_lines(a) if a else ["accuracy sweep: no accuracy.json"]
    return lines


ROW_LISTS = ("sweep", "decode", "errors", "rows")  # the per-form row lists of bench.json and accuracy.json


def _forms_of(doc):
    return sorted({r["form"] for k in ROW_LISTS for r in doc.get(k) or [] if "form" in r})


def _measured(doc, forms, note):
    """A merged_from entry: which commit measured these forms of DOC, when, and how (NOTE)."""
    return dict(commit=(doc.get("git") or {}).get("commit", "unknown"), created=doc.get("created"), forms=forms,
                note=note)


def merge_forms(into, new, note="") -> str:
    """Fold a sweep file (bench.json or accuracy.json) that measured some forms into the committed one: NEW's
    rows replace INTO's rows of the forms NEW measured, INTO keeps the rest. merged_from lists, newest first,
    which commit measured which forms (with NOTE: how that run differed from the code's defaults); the report
    cites it. The file's own fields (created, git, machine, config, ...) become NEW's."""
    old, fresh = _load(into) or {}, _load(new)
    if not fresh:
        raise SystemExit(f"merge-forms: {new} is missing or unreadable")
    forms = _forms_of(fresh)
    doc = dict(fresh)
    for k in ROW_LISTS:
        if k in fresh or k in old:
            doc[k] = (fresh.get(k) or []) + [r for r in old.get(k) or [] if r.get("form") not in forms]
    for k in ("forms", "ops"):
        if isinstance(old.get(k), dict) or isinstance(fresh.get(k), dict):
            doc[k] = {**(old.get(k) or {}), **(fresh.get(k) or {})}
    prior = old.get("merged_from") or ([_measured(old, _forms_of(old), old.get("note", ""))] if old else [])
    kept = [dict(m, forms=[f for f in m["forms"] if f not in forms]) for m in prior]
    doc["merged_from"] = [_measured(fresh, forms, note)] + [m for m in kept if m["forms"]]
    doc.pop("note", None)
    with open(into, "w") as f:
        json.dump(doc, f, indent=1)
    csv_path = os.path.splitext(into)[0] + ".csv"  # the CSV beside it, as the harness / accuracy sweep write it
    if doc.get("kind") == "accuracy":
        from benchmarks.accuracy import write_csv
        write_csv(csv_path, doc.get("rows") or [])
    else:
        from benchmarks.harness import write_csv
        write_csv(csv_path, (doc.get("sweep") or []) + (doc.get("decode") or []))
    return f"merged {new} ({', '.join(forms)}) into {into}: " + "; ".join(
        f"{m['commit']} for {', '.join(m['forms'])}" for m in doc["merged_from"])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_summary", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["machine", "merge", "tests", "bench", "merge-runs", "merge-forms"])
    p.add_argument("--into", help="merge-runs: output prefix (writes PREFIX.json and PREFIX.junit.xml)")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=PREFIX",
                   help="merge-runs: a run's label and its files' prefix (PREFIX.json, PREFIX.junit.xml), in order")
    p.add_argument("--new", help="merge-forms: the sweep file (bench.json / accuracy.json) to fold into --into")
    p.add_argument("--note", default="", help="merge-forms: how that run differed from the code's defaults")
    p.add_argument("--out", help="the session's output folder ($OUT)")
    p.add_argument("--data", help="reports/data/<gpu> (bench)")
    p.add_argument("--rc", help="pytest's exit code (tests)")
    p.add_argument("--timed-out", help="the time limit, when pytest was stopped by it (tests)")
    a = p.parse_args(argv)
    if a.what == "machine":
        rec = machine_record()
        with open(os.path.join(a.out, "machine.json"), "w") as f:
            json.dump(rec, f, indent=1)
        lines = machine_lines(rec)
    elif a.what == "merge":
        n = merge_records(os.path.join(a.out, "verification-gpu.json"))
        lines = [f"merged {n} worker record parts"] if n else []
    elif a.what == "tests":
        lines = tests_lines(a.out, a.rc, a.timed_out)
    elif a.what == "merge-runs":
        if not a.into or not a.run or any("=" not in r for r in a.run):
            p.error("merge-runs needs --into PREFIX and at least one --run LABEL=PREFIX")
        lines = [merge_runs(a.into, [tuple(r.split("=", 1)) for r in a.run])]
    elif a.what == "merge-forms":
        if not a.into or not a.new:
            p.error("merge-forms needs --into FILE and --new FILE")
        lines = [merge_forms(a.into, a.new, a.note)]
    else:
        lines = bench_lines(a.data)
    if lines:
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
