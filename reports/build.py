"""Build the self-contained HTML report: reports/site/index.html.

    python3 -m reports.build [--data reports/data] [--out reports/site/index.html]

Reads what the runs left under the data folder and never fails for missing data (a section says "not measured
yet"):

  verification-cpu.json (+ .junit.xml)   the property suite on this machine's CPU (fresh: `nox -s report`)
  accuracy-cpu.json                        a tiny CPU accuracy sweep (fresh: `nox -s report`)
  <gpu>/bench.json, <gpu>/accuracy.json    speed and accuracy sweeps on a GPU (committed; benchmarks/harness.py)
  <gpu>/verification-gpu.json              the property suite on that GPU (committed)
  verification-gpu.json                    the same as `nox -s gpu` writes it (machine from its meta)
  <gpu>/point-*.json                       single-configuration timings (harness --point)

Every accuracy and speed section has one part per op (the delta rule, DeltaFormer, IPLR, DPLR; the list is
benchmarks.registry.OPS), each op's forms beside fla's and causal SDPA (the baseline shown with every op); an op
without data says "not measured yet". Plots are PNGs inlined as base64 data URIs (matplotlib; without it the plots
are replaced by a note). No scripts, no network.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import glob
import html
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import registry as R  # noqa: E402  (no torch import: the op list and each form's op)
from benchmarks.gpu_summary import error_ratio, junit_cases, junit_nodeid  # noqa: E402

# Section ids and headings, in page order (the report test checks each is present).
SECTIONS = [
    ("sources", "Data sources"),
    ("machines", "Machines"),
    ("verification", "Verification matrix"),
    ("tolerances", "Tolerances"),
    ("accuracy", "Error vs T"),
    ("throughput", "Throughput"),
    ("memory", "Memory"),
    ("roofline", "Roofline"),
    ("peers", "Peer comparison"),
    ("first-call", "First-call times"),
    ("decode", "Decode"),
    ("goals", "Performance goals"),
    ("conformance", "Conformance"),
]
NOT_MEASURED = "not measured yet"
UNKNOWN_DTYPE = "dtype not recorded"
DTYPE_ORDER = ["float64", "float32", "float16", "bfloat16", UNKNOWN_DTYPE]
KNOWN_OPS = ["gated_delta_rule", "delta_rule", "iplr", "dplr", "deltaformer", "l2norm", "solve_tril"]
KNOWN_FORMS = ["fused_recurrent", "fused_chunk", "recurrent", "chunk", "parallel", "reference"]


OPS = list(R.OPS)
OP_LABELS = {o: R.FAMILIES[o].label or o for o in OPS}
DECODE_OPS = {f.family for f in R.FORMS if f.decode}


def op_doc(doc, op, keys, baselines=True):
    """`doc` with its rows under `keys` restricted to op's forms (+ baselines), or None (registry.op_subset)."""
    return R.op_subset(doc, op, keys, baselines)


def op_heading(op, extra="") -> str:
    return el("h4", esc(OP_LABELS.get(op, op) + extra))


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def el(tag, content="", **attrs) -> str:
    a = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return f"<{tag}{a}>{content}</{tag}>"


def fmt(v, spec=".3g", none="–"):
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def table(head, rows, cls=None) -> str:
    """head: list of header cells (plain text); rows: lists of cells, each plain text or ('html', markup[, attrs])."""
    def cell(tag, c):
        if isinstance(c, tuple):
            return el(tag, c[1], **(c[2] if len(c) > 2 else {}))
        return el(tag, esc(c))
    body = "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows)
    thead = "<thead><tr>" + "".join(cell("th", h) for h in head) + "</tr></thead>" if head else ""
    return el("table", thead + el("tbody", body), class_=cls)


def note(text) -> str:
    return el("p", esc(text), class_="note")


def missing(what) -> str:
    return el("p", esc(f"{what}: {NOT_MEASURED}."), class_="missing")


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def git_date(path):
    """(committed?, ISO date of the last commit touching path, or None)."""
    try:
        rel = os.path.relpath(path, REPO)
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", rel], cwd=REPO, capture_output=True,
                                 timeout=10).returncode == 0
        date = subprocess.run(["git", "log", "-1", "--format=%cI", "--", rel], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() if tracked else ""
        return tracked, date or None
    except Exception:
        return False, None


def cpu_model() -> str:
    """This machine's CPU model and core count (Linux /proc/cpuinfo, else platform)."""
    import platform
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def mtime(path):
    try:
        return datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc).isoformat(
            timespec="seconds")
    except OSError:
        return None


# --------------------------------------------------------------------------------------------------------------
# Plots (optional matplotlib)
# --------------------------------------------------------------------------------------------------------------

def _plots():
    try:
        from benchmarks import plots
        return plots
    except Exception as e:  # matplotlib missing
        return e


def img(fn_name, doc, alt) -> str:
    p = _plots()
    if isinstance(p, Exception):
        return note(f"plot unavailable: {type(p).__name__}: {p} (install matplotlib)")
    try:
        png = getattr(p, fn_name)(doc)
    except Exception as e:
        return note(f"plot failed: {type(e).__name__}: {e}")
    if not png:
        return missing(alt)
    return el("p", f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')


# --------------------------------------------------------------------------------------------------------------
# Verification records
# --------------------------------------------------------------------------------------------------------------

def _bounds():
    from properties.tolerances import FORWARD_ULPS, GRADIENT_ULPS, UNIT_ROUNDOFF
    out = []
    for dt, u in UNIT_ROUNDOFF.items():
        name = str(dt).replace("torch.", "")
        out.append((name, u, FORWARD_ULPS[dt], GRADIENT_ULPS[dt]))
    return out


def _dtype_from_bound(b, kind):
    try:
        hits = [(n, k) for n, u, f, g in _bounds() for k, m in (("forward", f), ("gradient", g))
                if math.isclose(b, m * u, rel_tol=1e-9)]
    except Exception:
        return UNKNOWN_DTYPE
    exact = [n for n, k in hits if k == kind]
    if exact:
        return exact[0]
    return hits[0][0] if len(hits) == 1 else UNKNOWN_DTYPE


def norm_dtype(s):
    s = str(s).replace("torch.", "")
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "half": "float16",
            "float": "float32", "double": "float64"}.get(s, s)


def parse_record(rec) -> dict:
    """A `record` fixture entry -> op, form, feature, quantity, dtype, err, bound.

    The test's module names the op and form (test_<form>_<op>.py), its function the feature (test_<form>_<what>),
    the record's name the quantity ('o', 'dq', 'final_state T=300', 'chunk.o': an optional '<form>.' prefix
    overrides the module's form); the dtype is a recorded field, else read from the test id, else the unique
    dtype whose bound in properties/tolerances.py equals the recorded bound."""
    nodeid = rec.get("test", "")
    path, _, rest = nodeid.partition("::")
    module = os.path.basename(path)
    module = module[:-3] if module.endswith(".py") else module
    module = module[5:] if module.startswith("test_") else module
    func, _, params = rest.partition("[")
    func = func[5:] if func.startswith("test_") else func
    op = next((o for o in KNOWN_OPS if o in module), None)
    form = module.replace(op, "").strip("_") if op else ""
    if form in ("ops", "op"):  # test_<op>_ops.py: several forms, named by the record or the test
        form = ""
    op = op or module
    name = str(rec.get("name", ""))
    quantity = name.split()[0] if name.split() else name
    if "." in quantity:
        prefix, quantity = quantity.split(".", 1)
        if prefix in KNOWN_FORMS:
            form = prefix
        elif prefix == op:
            pass
        elif not form:
            form = prefix
    form = form or "-"
    feature = func
    for p in (form + "_", op + "_"):
        if feature.startswith(p):
            feature = feature[len(p):]
    feature = (feature.replace("_", " ").strip() or "basic")
    kind = rec.get("kind") or ("gradient" if re.match(r"^d[a-z]", quantity) else "forward")
    dtype = rec.get("dtype")
    if dtype is None:
        m = re.search(r"(bfloat16|float16|float32|float64|bf16|fp16|fp32|fp64)", params)
        dtype = m.group(1) if m else None
    dtype = norm_dtype(dtype) if dtype is not None else _dtype_from_bound(float(rec.get("bound", 0) or 0), kind)
    err = rec.get("err")
    err = math.inf if err is None else float(err)
    b = float(rec.get("bound") or 0)
    return dict(op=op, form=form, feature=feature, quantity=quantity, dtype=dtype, err=err, bound=b,
                ratio=(err / b if b > 0 else math.inf), test=nodeid)


def verification_html(doc, junit_path=None, label="") -> str:
    if not doc or not doc.get("records"):
        return missing(f"{label} verification records")
    recs = [parse_record(r) for r in doc["records"] if not r.get("impl")]  # conformance records: own table
    if not recs:
        return missing(f"{label} verification records")
    meta = doc.get("meta", {})
    parts = [note(f"{label}: {len(recs)} measured errors from {len({r['test'] for r in recs})} tests on "
                  f"{meta.get('device', '?')}, torch {meta.get('torch', '?')}, hypothesis profile "
                  f"{meta.get('profile', '?')}, pytest exit status {meta.get('exitstatus', '?')}. Each cell: the worst "
                  "error / bound over every example and quantity (pass when <= 1); hover for the quantities.")]
    if meta.get("runs"):  # records merged from several runs: say which run measured what
        parts.append(note(f"{label}: {meta.get('note') or 'merged from several runs'}"))
        parts.append(table(["call", "commit", "what ran", "outcome"],
                           [[r.get("call") or r.get("label", ""),
                             short_commit(r.get("commit") or (r.get("meta") or {}).get("commit", "")),
                             r.get("tests") or f"{r.get('records', '?')} measured errors",
                             r.get("outcome") or r.get("note", "")]
                            for r in meta["runs"]]))
    elif meta.get("note"):  # one run: the commit and how it was run (switches set)
        parts.append(note(f"{label}: {meta['note']}"))
    dtypes = [d for d in DTYPE_ORDER if any(r["dtype"] == d for r in recs)]
    dtypes += sorted({r["dtype"] for r in recs} - set(dtypes))
    groups = {}
    for r in recs:
        groups.setdefault((r["op"], r["form"], r["feature"]), {}).setdefault(r["dtype"], []).append(r)
    rows = []
    for key in sorted(groups):
        cells = list(key)
        for d in dtypes:
            rs = groups[key].get(d)
            if not rs:
                cells.append("")
                continue
            worst = max(r["ratio"] for r in rs)
            ok = worst <= 1.0
            per_q = {}
            for r in rs:
                q = per_q.setdefault(r["quantity"], [0, 0.0, r["bound"]])
                q[0] += 1
                q[1] = max(q[1], r["err"])
            title = "; ".join(f"{q}: max {fmt(v[1])} / bound {fmt(v[2])} (n={v[0]})" for q, v in per_q.items())
            cells.append(("html", f"{'pass' if ok else 'FAIL'} {esc(fmt(worst, '.2g'))}",
                          dict(class_="pass" if ok else "fail", title=title)))
        rows.append(cells)
    parts.append(table(["op", "form", "feature"] + dtypes, rows, cls="matrix"))
    detail = {}
    for r in recs:
        k = (r["op"], r["form"], r["feature"], r["quantity"], r["dtype"])
        d = detail.setdefault(k, dict(n=0, err=0.0, bound=r["bound"]))
        d["n"] += 1
        d["err"] = max(d["err"], r["err"])
    drows = []
    for k in sorted(detail):
        d = detail[k]
        ratio = d["err"] / d["bound"] if d["bound"] > 0 else math.inf
        ok = ratio <= 1
        drows.append(list(k) + [d["n"], fmt(d["err"]), fmt(d["bound"]), fmt(ratio, ".2g"),
                                ("html", "pass" if ok else "FAIL", dict(class_="pass" if ok else "fail"))])
    parts.append(el("details", el("summary", esc(f"{label}: every quantity ({len(drows)} rows)"))
                    + table(["op", "form", "feature", "quantity", "dtype", "examples", "max error", "bound",
                             "error / bound", ""], drows)))
    parts.append(junit_html(junit_path, label, collected_ids(meta)))
    return "".join(parts)


def _junit_outcomes(path, module="test_conformance"):
    """{test id (name[param]): [(outcome, message + text)]} of a junit file's tests of `module`, one entry per
    run of the test (a file merged from several runs can hold a test more than once; hypothesis puts its
    smallest failing example, "Falsifying example: ...", into a failure's text)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    out = {}
    for cls, name, outcome, msg, text, _ in junit_cases(root):
        if name and module in (cls or ""):
            out.setdefault(name, []).append((outcome, f"{msg}\n{text}" if outcome in ("failed", "error") else msg))
    return out


def _falsifying(text):
    """hypothesis's smallest failing input in a failure's text ('Falsifying example: check(...)', since 6.16x
    'Failing test case: check(...)'; pytest prefixes each line with 'E')."""
    text = re.sub(r"(?m)^E ?", "", text or "")
    m = re.search(r"(?:Falsifying example|Failing test case): (\w+\(.*?\n\s*\))", text, re.S)
    return re.sub(r",\s*\)", ")", re.sub(r"\(\s+", "(", re.sub(r"\s+", " ", m.group(1)))) if m else ""


def _first_error_line(text):
    """The exception line of a failure's text (e.g. 'CompilationError: at 33:4:'), short."""
    for line in (text or "").splitlines():
        line = line.strip()
        if re.match(r"^(E\s+)?[\w.]*(Error|Exception|Interrupted)\b", line):
            return re.sub(r"^E\s+", "", line)[:140]
    return " ".join((text or "").split())[:140]


def conformance_cells(doc, junit_path):
    """{(prop, impl, dtype): cell} from a conformance run's records and its junit outcomes. cell: status (pass,
    fail, unsupported, not run), ratio (worst error / bound), reason, part (a part of the property unsupported),
    example (hypothesis's smallest failing input), error (the exception of a failure that recorded no error),
    checks (errors recorded). The run's collected test ids (meta.collected) are the expected cases: one never
    reported (cut off by the time limit, or never started) is 'not run', never a pass, also when the checks it
    recorded before it was stopped are within their bounds (a failing check is a failure all the same)."""
    recs = [r for r in (doc or {}).get("records") or [] if r.get("impl")]
    runs = _junit_outcomes(junit_path) if junit_path else {}
    collected = collected_ids((doc or {}).get("meta"))
    cells = {}
    case_id = re.compile(r"test_(\w+)\[(.+)-(\w+)\]$")

    def cell(prop, impl, d):
        return cells.setdefault((prop, impl, d), dict(status=None, ratio=0.0, reason="", part="", example="",
                                                      error="", checks=0))
    for r in recs:
        prop = r["prop"].split(" (")[0]
        m = case_id.search(str(r.get("test", "")))
        dt = str(r.get("dtype", "")).replace("torch.", "")
        c = cell(prop, r["impl"], m.group(3) if m else R.SHORT.get(dt, dt or "any"))
        if r.get("status") == "unsupported":
            if r["prop"] == prop:
                c["status"], c["reason"] = "unsupported", r.get("reason", "")
            else:
                c["part"] = f"{r['prop'].split(' (')[1].rstrip(')')}: {r.get('reason', '')}"
            continue
        b, e = float(r["bound"]), float(r["err"])
        c["ratio"] = max(c["ratio"], error_ratio(e, b))
        c["checks"] += 1
        if r.get("status") == "fail":
            c["status"] = "fail"
        elif c["status"] is None:
            c["status"] = "pass"
    reported = set()
    for name, outcomes in runs.items():
        m = case_id.match(name)
        if not m:
            continue
        reported.add((m.group(1), m.group(2), m.group(3)))
        c = cell(m.group(1), m.group(2), m.group(3))
        for outcome, text in outcomes:
            if outcome in ("failed", "error"):
                c["example"] = c["example"] or _falsifying(text)
                c["error"] = c["error"] or _first_error_line(text)
                if c["status"] != "unsupported" or outcome == "failed":
                    c["status"] = "fail"
            elif outcome == "skipped" and c["status"] is None:
                c["status"], c["reason"] = "unsupported", text.split("unsupported by ", 1)[-1][:160]
            elif outcome == "passed" and c["status"] is None:
                c["status"] = "pass"
    for nodeid in collected:  # collected but never reported: cut off, or never started
        m = case_id.search(nodeid.rsplit("::", 1)[-1])
        if m and "test_conformance" in nodeid:
            cell(m.group(1), m.group(2), m.group(3))
    dtypes = [d for d in ("fp16", "bf16", "fp32", "fp64") if any(k[2] == d for k in cells)]
    dtypes += list(dict.fromkeys(k[2] for k in cells if k[2] not in dtypes))
    props = list(dict.fromkeys(k[0] for k in cells))
    impls = list(dict.fromkeys(k[1] for k in cells))
    for key, c in cells.items():
        if runs and c["status"] == "pass" and key not in reported:  # stopped mid-way: its checks so far passed
            c["status"], c["reason"] = None, f"cut off after {c['checks']} checks within their bounds"
        c["status"] = c["status"] or "not run"
    return props, impls, dtypes, cells


_RANK = {"fail": 3, "not run": 2, "unsupported": 1, "pass": 0}  # a cell's colour: its worst dtype's status
_CSS = {"fail": "fail", "pass": "pass", "not run": "notrun", "unsupported": "unsupported"}


def conformance_html(doc, junit_path, label) -> str:
    """Rows: the conformance properties; columns: implementations; each cell per dtype: pass (worst error /
    bound), FAIL (worst error / bound or the exception, and hypothesis's smallest failing example), unsupported
    (the reason) or not run (never reported: cut off by the run's time limit)."""
    props, impls, dtypes, cells = conformance_cells(doc, junit_path)
    if not cells:
        return missing(f"{label} conformance records")
    rows, counts = [], {}
    for prop in props:
        row = [prop.replace("_", " ")]
        for impl in impls:
            parts, cls = [], None
            for d in dtypes:
                c = cells.get((prop, impl, d))
                if c is None:
                    continue
                st = c["status"]
                counts[st] = counts.get(st, 0) + 1
                if st == "unsupported":
                    text = f"unsupported ({c['reason']})"
                elif st == "fail":
                    finite = 1 < c["ratio"] < math.inf
                    what = fmt(c["ratio"], ".2g") + " x bound" if finite else c["error"] or fmt(c["ratio"], ".2g")
                    text = f"FAIL {what}" + (f" at {c['example']}" if c["example"] else "")
                elif st == "not run":
                    text = f"not run ({c['reason']})" if c["reason"] else "not run"
                else:
                    text = f"pass {fmt(c['ratio'], '.2g')}" + (f" (unsupported {c['part']})" if c["part"] else "")
                if parts and parts[-1][1] == text:  # dtypes with the same outcome share one entry
                    parts[-1][0].append(d)
                else:
                    parts.append(([d], text))
                cls = st if cls is None or _RANK[st] > _RANK[cls] else cls
            parts = [f"{', '.join(ds)}: {text}" for ds, text in parts]
            css = _CSS.get(cls, "")
            row.append(("html", esc("; ".join(parts)), dict(class_=css)) if parts else "–")
        rows.append(row)
    tally = ", ".join(f"{counts[k]} {k}" for k in ("pass", "fail", "unsupported", "not run") if counts.get(k))
    runs = ((doc or {}).get("meta") or {}).get("runs")
    merged = (" Merged from " + "; ".join(f"{r.get('label')} ({r.get('note', '')})".replace(" ()", "")
                                          for r in runs) + ".") if runs else ""
    return (table(["property"] + impls, rows)
            + note(f"{label}: properties/test_conformance.py against each implementation (benchmarks/registry.py "
                   f"forms); cases (property x implementation x dtype): {tally}.{merged} pass / FAIL: the worst "
                   "error / bound over the examples (or the exception a failing case raised); unsupported: what "
                   "the implementation declares it does not do (or cannot run here), reported rather than "
                   "skipped; not run: the case never reported (cut off by the run's time limit, with the checks it "
                   "recorded before, if any, all within their bounds)."))


def collected_ids(meta):
    """The test ids a run collected (meta.collected), and those of every run merged into it (meta.runs)."""
    ids = list((meta or {}).get("collected") or [])
    for run in (meta or {}).get("runs") or []:
        ids += (run.get("meta") or {}).get("collected") or []
    return list(dict.fromkeys(ids))


def junit_html(path, label, collected=()) -> str:
    """Outcomes of every test (also those that record no error: gradcheck, bad input, NaN propagation). With the
    collected ids, the tests no run reported (cut off by a time limit, or never started) are named."""
    if not path or not os.path.exists(path):
        return ""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return note(f"{label}: unreadable junit file ({e})")
    per_file, bad, cut, reported = {}, [], 0, set()
    for cls, name, outcome, msg, _, _ in junit_cases(root):
        if outcome == "cut_off":
            cut += 1
            continue
        reported.add(junit_nodeid(cls, name))
        f = (cls or "?").split(".")[-1]
        c = per_file.setdefault(f, dict(passed=0, failed=0, error=0, skipped=0))
        c[outcome] += 1
        if outcome in ("failed", "error"):
            bad.append((f, name, outcome, msg.splitlines()[0][:240] if msg else ""))
    rows = [[f, c["passed"], c["failed"], c["error"], c["skipped"]] for f, c in sorted(per_file.items())]
    tot = [sum(r[i] for r in rows) for i in range(1, 5)]
    rows.append([("html", "<b>total</b>")] + tot)
    out = el("h3", esc(f"{label}: test outcomes")) + table(["test module", "passed", "failed", "errors", "skipped"],
                                                             rows)
    runs = sum(tot)
    if runs > len(reported):
        out += note(f"{runs} reports of {len(reported)} distinct tests: a test run again in a later call (e.g. after "
                    "a kernel change) is counted once per run.")
    missed = [c for c in collected if c not in reported]
    if missed:
        out += note(f"{len(missed)} of {len(collected)} collected tests never reported (cut off by a time limit, or "
                    f"never started): counted nowhere above, not passed: " + ", ".join(missed))
    elif cut and not collected:
        out += note(f"{cut} test(s) stopped by the time limit before finishing: counted nowhere above, not passed")
    if bad:
        out += el("details", el("summary", esc(f"{len(bad)} failing tests"))
                  + table(["module", "test", "outcome", "message"], [list(b) for b in bad]), open="open")
    return out


# --------------------------------------------------------------------------------------------------------------
# GPU data
# --------------------------------------------------------------------------------------------------------------

def find_gpu_dirs(data):
    """Subfolders of the data folder that hold a bench, accuracy, point or verification file."""
    out = []
    for d in sorted(glob.glob(os.path.join(data, "*"))):
        if not os.path.isdir(d) or os.path.basename(d).startswith("_"):
            continue
        if any(os.path.exists(os.path.join(d, f)) for f in ("bench.json", "accuracy.json", "verification-gpu.json")) \
                or glob.glob(os.path.join(d, "point-*.json")):
            out.append(d)
    return out


def provenance(path, doc=None) -> str:
    committed, date = git_date(path)
    created = (doc or {}).get("created")
    rel = os.path.relpath(path, REPO)
    bits = [f"{rel}"]
    if created:
        bits.append(f"measured {created}")
    bits.append(f"committed {date}" if committed and date else ("committed" if committed else
                                                                 f"not committed (file from {mtime(path)})"))
    g = (doc or {}).get("git") or {}
    if (doc or {}).get("merged_from"):  # a sweep joined from runs at several commits, each for some forms
        bits.append("code at " + "; ".join(f"{short_commit(m['commit'])} for {', '.join(m['forms'])}"
                                           + (f" ({m['note']})" if m.get("note") else "")
                                           for m in doc["merged_from"]))
    elif g.get("commit") and g["commit"] != "unknown":
        bits.append(f"code at {short_commit(g['commit'])}{' + local changes' if g.get('dirty') else ''}")
        if (doc or {}).get("note"):  # how that run differed from the code's defaults (switches set)
            bits.append(doc["note"])
    if (doc or {}).get("source"):
        bits.append(f"source hash {doc['source']}")
    return ", ".join(bits)


def machine_from_record(rec):
    """gpu_summary's machine.json (a GPU visit with no benchmark) in the harness's machine layout, or None."""
    if not rec:
        return None
    smi = rec.get("nvidia_smi")
    m = dict(rec, nvidia_smi=smi[0] if isinstance(smi, list) and smi else (smi if isinstance(smi, dict) else {}),
             fla=rec.get("fla-core") or rec.get("flash-linear-attention"))
    if rec.get("total_memory_gib"):
        m["total_memory"] = rec["total_memory_gib"] * 2 ** 30
    return m


def machine_rows(m):
    if not m:
        return []
    smi = m.get("nvidia_smi") or {}
    keys = [("GPU", m.get("gpu")), ("SMs", m.get("sm_count")), ("compute capability", m.get("compute_capability")),
            ("memory", f"{m['total_memory'] / 2 ** 30:.1f} GiB" if m.get("total_memory") else None),
            ("L2", f"{m['L2_cache_size'] / 2 ** 20:.0f} MiB" if m.get("L2_cache_size") else None),
            ("driver", smi.get("driver_version")),
            ("SM clock at start (idle) / max",
             f"{smi.get('clocks.sm')} / {smi.get('clocks.max.sm')}" if smi.get("clocks.sm") else None),
            ("memory clock at start / max", f"{smi.get('clocks.mem')} / {smi.get('clocks.max.mem')}"
             if smi.get("clocks.mem") else None),
            ("power limit", smi.get("power.limit")),
            ("torch", m.get("torch")), ("CUDA", m.get("cuda")), ("triton", m.get("triton")), ("fla", m.get("fla")),
            ("python", m.get("python")), ("platform", m.get("platform"))]
    return [[k, v] for k, v in keys if v is not None]


def _label(bench, name):
    return (bench.get("forms") or {}).get(name, {}).get("label", name)


def _ok(rows, **kw):
    return [r for r in rows or [] if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items())]


def sweep_table(bench) -> str:
    rows = []
    for r in bench.get("sweep") or []:
        if r.get("status") == "ok":
            rows.append([_label(bench, r["form"]), r["mode"], r["dtype"], r["B"], r["T"], r["H"], r["K"], r["V"],
                         fmt(r["ms"], ".4g"), fmt(r["tokens_per_s"] / 1e6, ".4g"), fmt(r["tflops"], ".3g"),
                         fmt(r["gbps"], ".4g"), fmt(100 * r["frac_peak_flops"], ".2g") if r.get("frac_peak_flops")
                         is not None else "–",
                         fmt(100 * r["frac_roofline"], ".2g") if r.get("frac_roofline") is not None else "–",
                         fmt(r["mem_extra_bytes"] / 2 ** 30, ".3g") if r.get("mem_extra_bytes") is not None
                         else "–",
                         fmt(r["mem_peak_bytes"] / 2 ** 30, ".3g") if r.get("mem_peak_bytes") else "–", "ok"])
        else:
            rows.append([_label(bench, r["form"]), r.get("mode"), r.get("dtype"), r.get("B"), r.get("T"), r.get("H"),
                         r.get("K"), r.get("V")] + [""] * 8 + [f"{r.get('status')}: {r.get('reason', '')}"])
    return table(["form", "mode", "dtype", "B", "T", "H", "K", "V", "ms", "Mtok/s", "TFLOP/s", "GB/s",
                  "% matmul peak", "% roofline", "GiB allocated", "peak GiB (process)", "status"], rows)


def peer_html(bench) -> str:
    """Per mode and T: each of our forms beside its fla counterpart (ratio fla / ours: > 1 means ours is faster)
    and causal SDPA beside our fastest form."""
    sweep = bench.get("sweep") or []
    if not _ok(sweep):
        return missing("peer comparison")
    forms = bench.get("forms") or {}
    ours = [n for n, f in forms.items() if f.get("provider") == "ours" and any(r["form"] == n for r in sweep)]
    fla = {f["form"]: n for n, f in forms.items() if f.get("provider") == "fla" and any(r["form"] == n for r in sweep)}
    sd = [n for n, f in forms.items() if f.get("provider") == "torch" and any(r["form"] == n for r in sweep)]
    out = []
    first = sweep[0]
    cfg = dict(dtype=first["dtype"], H=first["H"], K=first["K"], V=first["V"])
    for mode in ("fwd", "fwd+bwd"):
        rows_mode = [r for r in sweep if r.get("mode") == mode and all(r.get(k) == v for k, v in cfg.items())]
        if not rows_mode:
            continue
        head = ["T", "B"]
        for n in ours:
            head.append(f"{_label(bench, n)} ms")
            if forms[n]["form"] in fla:
                head += [f"{_label(bench, fla[forms[n]['form']])} ms", "fla / ours"]
        for n in sd:
            head += [f"{_label(bench, n)} ms", "SDPA / best ours"]
        rows = []
        for T in sorted({r["T"] for r in rows_mode}):
            at = {r["form"]: r for r in rows_mode if r["T"] == T}
            ms = {n: r["ms"] for n, r in at.items() if r.get("status") == "ok"}
            row = [T, next(iter(at.values()))["B"]]
            for n in ours:
                row.append(fmt(ms.get(n), ".4g"))
                if forms[n]["form"] in fla:
                    p = fla[forms[n]["form"]]
                    row.append(fmt(ms.get(p), ".4g"))
                    row.append(_ratio(ms.get(p), ms.get(n)))
            best = min((ms[n] for n in ours if n in ms), default=None)
            for n in sd:
                row.append(fmt(ms.get(n), ".4g"))
                row.append(_ratio(ms.get(n), best))
            rows.append(row)
        out.append(el("h5", esc(f"{mode} ({cfg['dtype']}, H={cfg['H']}, K={cfg['K']}, V={cfg['V']})")) +
                   table(head, rows))
    out.append(note("Ratios above 1 mean ours is faster. Blank: the form skipped or failed that point (the full "
                    "table under Throughput gives the reason)."))
    return "".join(out)


# Issue 7's goals at H=16, K=V=128, bf16: (form, mode, B, T, fla's form, goal for ours / fla)
SPEED_GOALS = [
    ("chunk", "fwd", 8, 4096, "fla.chunk", 0.8), ("chunk", "fwd+bwd", 8, 4096, "fla.chunk", 0.8),
    ("chunk", "fwd", 2, 16384, "fla.chunk", 0.8), ("chunk", "fwd+bwd", 2, 16384, "fla.chunk", 0.8),
    ("fused_recurrent", "fwd", 8, 4096, "fla.fused_recurrent", 0.8),
    ("fused_recurrent", "fwd+bwd", 8, 4096, "fla.fused_recurrent", 0.5),
    ("dplr.chunk", "fwd", 8, 4096, "fla.dplr.chunk", 0.8), ("dplr.chunk", "fwd+bwd", 8, 4096, "fla.dplr.chunk", 0.7),
]
GOAL_SHAPE = dict(H=16, K=128, V=128, dtype="bf16")
DECODE_GOAL = ("fused_recurrent", 256, 0.7)  # state read + write at >= 70 % of the copy bandwidth
FIRST_CALL_GOAL_S = 10.0
# bf16 error vs float64 of o and of the gradients: no worse than fla's on the same inputs (form, fla's form)
ACCURACY_GOALS = [("chunk", "fla.chunk"), ("dplr.chunk", "fla.dplr.chunk")]


def _floor_ms(r):
    """The roofline time max(FLOPs / matmul peak, bytes / copy bandwidth) in ms: the row's time times the fraction
    of the roofline it reached (harness.add_fractions, with the ceilings measured in that run)."""
    return r["ms"] * r["frac_roofline"] if r.get("frac_roofline") else None


def short_commit(commit, n=10) -> str:
    """A commit SHA's first n characters; a label that is not a bare SHA (e.g. "51c0629+tuned") whole."""
    c = str(commit or "")
    return c[:n] if re.fullmatch(r"[0-9a-f]+", c) else c


def _measured(doc, form):
    """(created, commit, note) of the run that measured `form` in doc: for a sweep joined from several runs
    (merged_from), that form's run, else the document's own."""
    for m in doc.get("merged_from") or []:
        if form in m.get("forms", ()):
            return str(m.get("created") or ""), short_commit(m.get("commit") or "?", 7), m.get("note") or ""
    commit = short_commit((doc.get("git") or {}).get("commit") or "?", 7)
    return str(doc.get("created") or ""), commit, doc.get("note") or ""


def _accuracy_of(doc, form):
    """The bf16 accuracy entry (harness --accuracy) of `form` in a point document, when it measured errors."""
    return next((a for a in doc.get("accuracy") or [] if a.get("form") == form and a.get("status") == "ok"
                 and a.get("errors") and a.get("dtype") == GOAL_SHAPE["dtype"]), None)


def _same_inputs(a, b, da, db):
    """Two accuracy entries drew the same inputs: same shape compared, same seed (the harness seeds by T)."""
    keys = ("B_compared", "T_measured", "H", "K", "V", "dtype")
    return all(a.get(k) == b.get(k) for k in keys) and \
        (da.get("config") or {}).get("seed") == (db.get("config") or {}).get("seed")


def accuracy_goals_html(points, other_points=()) -> str:
    """The accuracy goal: ours' bf16 error (o, and the worst gradient) no worse than fla's on the same inputs.
    fla's errors come from the newest run that measured both where there is one; else from the newest run on any
    GPU (other_points: [(gpu, doc)]) that drew the same seeded inputs, and the row names that run."""
    def worst(e):
        g = {k: v for k, v in e.items() if k.startswith("d")}
        return max(g.items(), key=lambda kv: kv[1]) if g else (None, None)
    docs = sorted(points or [], key=lambda d: str(d.get("created") or ""), reverse=True)
    others = sorted(other_points, key=lambda gx: str(gx[1].get("created") or ""), reverse=True)
    trs = []
    for form, peer in ACCURACY_GOALS:
        mine = [d for d in docs if _accuracy_of(d, form)]
        if not mine:
            continue
        both = next((d for d in mine if _accuracy_of(d, peer)), None)
        d = both or mine[0]
        ours = _accuracy_of(d, form)
        theirs, where = (_accuracy_of(both, peer), "the same run") if both else (None, None)
        if theirs is None:
            for gpu, x in [("this GPU", x) for x in docs] + others:
                a = _accuracy_of(x, peer)
                if a and _same_inputs(ours, a, d, x):
                    theirs = a
                    where = f"{gpu} at {_measured(x, peer)[1]} (another run, same seeded inputs)"
                    break
        eo, et = ours["errors"], (theirs or {}).get("errors") or {}
        wo, wt = worst(eo), worst(et)
        row = [form, f"T={ours.get('T_measured')}, B={ours.get('B_compared')}", _measured(d, form)[1],
               fmt(eo.get("o"), ".3g"), fmt(et.get("o"), ".3g"), f"{fmt(wo[1], '.3g')} ({wo[0]})",
               f"{fmt(wt[1], '.3g')} ({wt[0]})" if wt[0] else "–"]
        if not theirs:
            trs.append(row + ["–", "fla not measured on these inputs"])
            continue
        over = [k for k in eo if k in et and eo[k] > et[k]]
        ok = eo["o"] <= et["o"] and wo[1] <= wt[1]
        trs.append(row + [", ".join(f"{k} {eo[k] / et[k]:.3f}x" for k in over) or "none", (
            "html", f"met (fla: {esc(where)})" if ok else f"missed (fla: {esc(where)})",
            dict(class_="pass" if ok else "fail"))])
    if not trs:
        return missing("bf16 accuracy beside fla")
    return table(["bf16 error vs float64", "compared", "ours at", "ours o", "fla o", "ours worst gradient",
                  "fla worst gradient", "quantities where ours > fla (ours / fla)", "goal: no worse than fla"], trs)


def goals_html(bench, points, cold_calls=(), other_points=()) -> str:
    """Issue 7's goals with the measured ratios. Ours and fla's times come from one document (one run) only;
    a goal whose fla time is not in the same run says so instead of borrowing a number. cold_calls: [(path, doc)] of
    benchmarks/first_call.py (a fwd+bwd first call in a fresh process with an empty Triton cache; each form's newest
    run per compile-ahead setting and point judges the goal). other_points: [(gpu, doc)] of the other GPUs' point
    documents, where the accuracy goal may find fla's errors on the same seeded inputs."""
    docs = ([bench] if bench and bench.get("sweep") else []) + list(points or [])
    if not docs:
        return missing("performance goals")

    def rows_of(d):
        return _ok(d.get("sweep") or []) + _ok(d.get("rows") or [])

    def find(d, form, mode, B, T):
        return next((r for r in rows_of(d) if r["form"] == form and r["mode"] == mode and r["B"] == B
                     and r["T"] == T and all(r.get(k) == v for k, v in GOAL_SHAPE.items())), None)

    trs = []
    for form, mode, B, T, peer, goal in SPEED_GOALS:
        best = None
        for d in sorted(docs, key=lambda x: _measured(x, form)[0], reverse=True):
            ours, theirs = find(d, form, mode, B, T), find(d, peer, mode, B, T)  # the newest run that has both;
            if ours and (theirs or best is None):  # else the newest that has ours
                best = (d, ours, theirs)
                if theirs:
                    break
        if best is None:
            trs.append([_label(docs[0], form), mode, f"B={B}, T={T}", "–", "–", "–", fmt(goal), "–",
                        "not measured yet", "–"])
            continue
        d, ours, theirs = best
        fl = _floor_ms(ours)
        ratio = ours["ms"] / theirs["ms"] if theirs else None
        verdict = ("html", "met" if ratio <= goal else "missed", dict(class_="pass" if ratio <= goal else "fail")) \
            if ratio is not None else "fla not measured in this run"
        # ours in the newest run that measured it, when that is not the run above (no fla there: no ratio)
        newest = max((x for x in docs if find(x, form, mode, B, T)), key=lambda x: _measured(x, form)[0])
        later = "–"
        if newest is not d and _measured(newest, form)[0] > _measured(d, form)[0]:
            _, commit, run_note = _measured(newest, form)
            switches = sorted(set(re.findall(r"DELTACHECK_\w+=\w+", run_note)))
            later = (f"{fmt(find(newest, form, mode, B, T)['ms'], '.4g')} at {commit}"
                     + (f" with {', '.join(switches)}" if switches else ""))
        trs.append([_label(d, form), mode, f"B={B}, T={T}", fmt(ours["ms"], ".4g"),
                    fmt(theirs["ms"], ".4g") if theirs else "–", fmt(ratio, ".3g") if ratio else "–", fmt(goal),
                    f"{fmt(fl, '.3g')} ms (x{fmt(ours['ms'] / fl, '.3g')})" if fl else "–", verdict, later])
    out = [table(["form", "mode", "shape", "ours ms", "fla ms", "ours / fla", "goal", "roofline floor (ours at)",
                  "", "ours ms in a later run (no fla there)"], trs)]
    form, N, frac = DECODE_GOAL
    dec = next((r for r in _ok((bench or {}).get("decode")) if r["form"] == form and r["N"] == N), None)
    if dec and dec.get("frac_copy_bw_state") is not None:
        ok = dec["frac_copy_bw_state"] >= frac
        out.append(table(["decode (T = 1, carried state)", "batch", "state GB/s", "% of copy", "goal", ""],
                         [[_label(bench, form), N, fmt(dec["state_gbps"], ".4g"),
                           fmt(100 * dec["frac_copy_bw_state"], ".3g"), f">= {100 * frac:.0f} %",
                           ("html", "met" if ok else "missed", dict(class_="pass" if ok else "fail"))]]))
    else:
        out.append(missing(f"decode at batch {N}"))
    fc = []
    for name in ("chunk", "dplr.chunk", "fla.chunk", "fla.dplr.chunk"):
        def cold_of(d):
            return {r["mode"]: r for r in rows_of(d) if r["form"] == name and r.get("cold")}
        runs = [d for d in docs if {"fwd", "fwd+bwd"} <= set(cold_of(d))]
        if not runs:
            continue
        d = max(runs, key=lambda x: _measured(x, name)[0])  # the form's newest run
        cold = cold_of(d)
        s = (cold["fwd"]["first_call_ms"] + cold["fwd+bwd"]["first_call_ms"]) / 1e3
        _, commit, _ = _measured(d, name)  # no verdict: the cache it found is not recorded
        fc.append([f"{_label(d, name)}: first calls in a benchmark run at {commit} (its Triton cache as the run "
                   "found it)", f"B={cold['fwd']['B']}, T={cold['fwd']['T']}", fmt(s, ".3g"),
                   f"<= {FIRST_CALL_GOAL_S:g} s", "not the goal's measure (cache state unknown)"])
    newest = {}  # (form, compile ahead, B, T) -> (created, commit, row, point) of the newest fresh-process run
    for _, doc in cold_calls:
        pt = doc.get("point") or {}
        created, commit, _ = _measured(doc, None)
        for r in doc.get("rows", []):
            if r.get("mode") != "fwd+bwd" or r.get("status") != "ok":
                continue
            key = (r["form"], bool(r.get("ahead")), pt.get("B"), pt.get("T"))
            if key not in newest or created > newest[key][0]:
                newest[key] = (created, commit, r, pt)
    for (form, ahead, _, _), (_, commit, r, pt) in sorted(newest.items(), key=lambda kv: kv[0][:2]):
        ok = r["first_s"] <= FIRST_CALL_GOAL_S
        how = "compile ahead on (the default)" if ahead else "compile ahead off (DELTACHECK_COMPILE_AHEAD=0)"
        fc.append([f"{form}: fwd+bwd, fresh process, empty Triton cache, {how}, at {commit}",
                   f"B={pt.get('B')}, T={pt.get('T')}", fmt(r["first_s"], ".3g"), f"<= {FIRST_CALL_GOAL_S:g} s",
                   ("html", "met" if ok else "missed", dict(class_="pass" if ok else "fail"))])
    out.append(table(["first call, fwd then fwd+bwd (compile + autotune)", "shape", "s", "goal", ""], fc)
               if fc else missing("first-call times"))
    out.append(accuracy_goals_html(points, other_points))
    out.append(note("Goals from issue 7 (H100, bf16, H=16, K=V=128). Ratio = our time / fla 0.6.0's in the same "
                    "run. Floor = max(FLOPs / bf16 matmul peak, fewest bytes / copy bandwidth), both ceilings "
                    "measured in that run; benchmarks/NOTES.md keeps each version's prediction and outcome. "
                    "First calls: the goal's measure is a fresh process with an empty Triton cache "
                    "(benchmarks/first_call.py rows); a benchmark run's first calls may find kernels (and fla's "
                    "autotune results) already cached by an earlier run on the machine. Accuracy: relative error "
                    "vs the float64 reference on the same rounded bf16 inputs (harness --accuracy; the reference "
                    "caps T where it is slow), goal met when ours' o and worst gradient errors are no larger than "
                    "fla's."))
    return "".join(out)


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    v = a / b
    return ("html", esc(fmt(v, ".3g")), dict(class_="pass" if v >= 1 else "fail"))


def first_call_html(bench, points, cold=()) -> str:
    """First-call times of the sweep, the points and (cold: [(path, doc)]) benchmarks/first_call.py's files."""
    sweep = _ok(bench.get("sweep") if bench else [])
    if not sweep and not points and not cold:
        return missing("first-call times")
    out = []
    for path, doc in cold:  # benchmarks/first_call.py: a fresh process and an empty Triton cache per measurement
        rows = [[r["form"], r["mode"], "on" if r.get("ahead") else "off",
                 fmt(r["first_s"], ".3g") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}",
                 fmt(r["second_s"] * 1e3, ".4g") if r.get("status") == "ok" else "–"] for r in doc.get("rows", [])]
        pt = doc.get("point", {})
        out.append(el("h3", esc("cold first calls, --point " + ",".join(f"{k}={v}" for k, v in pt.items())))
                   + table(["form", "mode", "compile ahead", "first call (s)", "second call (ms)"], rows)
                   + note("Each row in a fresh process with an empty Triton cache (benchmarks/first_call.py, "
                          f"{provenance(path, doc)}): compilation and launch choices included. Compile ahead: "
                          "ops/common/compile_ahead.py (DELTACHECK_COMPILE_AHEAD)."))
    if sweep:
        rows = []
        order = list((bench.get("forms") or {}).keys())
        pairs = sorted({(r["form"], r["mode"]) for r in sweep},
                       key=lambda p: (order.index(p[0]) if p[0] in order else len(order), p[1]))
        for (name, mode) in pairs:
            rs = [r for r in sweep if r["form"] == name and r["mode"] == mode]
            cold = [r for r in rs if r.get("cold")]
            later = [r for r in rs if not r.get("cold")]
            c = cold[0] if cold else None
            med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
            rows.append([_label(bench, name), mode, fmt(c["first_call_ms"] / 1e3, ".3g") if c else "–",
                         c["T"] if c else "–", fmt(med([r["first_call_ms"] for r in later]), ".4g"),
                         fmt(med([r["first_call_ms"] / r["ms"] for r in later if r.get("ms")]), ".3g"), len(rs)])
        out.append(table(["form", "mode", "first call in a fresh process (s)", "at T",
                          "first call at each later T (ms, median)", "… / steady-state time (median)", "points"],
                         rows))
        out.append(note("The first call of a form in a fresh process includes Triton compilation and any "
                        "autotuning (an empty kernel cache on a fresh machine). fwd+bwd points run after the fwd "
                        "point of the same shape, so their first call compiles the backward only. A later T can "
                        "compile again where a kernel specializes on it (autotuning keys, divisibility)."))
    for p in points:
        rows = [[_label(p, r["form"]), r["mode"], fmt(r["first_call_ms"] / 1e3, ".3g"), fmt(r["ms"], ".4g")]
                for r in _ok(p.get("rows"))]
        if rows:
            pt = p.get("point", {})
            out.append(el("h3", esc("--point " + ",".join(f"{k}={v}" for k, v in pt.items())))
                       + table(["form", "mode", "first call (s)", "median ms"], rows))
    return "".join(out)


def decode_html(bench) -> str:
    rows = _ok((bench or {}).get("decode"))
    if not rows:
        return missing("decode")
    out = [img("decode_bandwidth", bench, "decode bandwidth")]
    forms = []
    for r in rows:
        if r["form"] not in forms:
            forms.append(r["form"])
    trs = []
    for N in sorted({r["N"] for r in rows}):
        row = [N]
        for n in forms:
            r = next((r for r in rows if r["N"] == N and r["form"] == n), None)
            row += [fmt(r["us"], ".4g") if r else "–", fmt(r["state_gbps"], ".4g") if r else "–",
                    fmt(100 * r["frac_copy_bw_state"], ".2g") if r and r.get("frac_copy_bw_state") is not None
                    else "–"]
        trs.append(row)
    head = ["batch"] + [h for n in forms for h in (f"{_label(bench, n)} µs", "state GB/s", "% copy")]
    out.append(table(head, trs))
    out.append(note("One token per sequence with the state carried in and out (fp32 [N, H, K, V]): GB/s counts one "
                    "read and one write of the state; the copy ceiling counts read + write the same way."))
    return "".join(out)


def ceilings_html(bench) -> str:
    c = bench.get("ceilings") or {}
    rows = [[f"{k} matmul", fmt(v, ".4g"), "TFLOP/s"] for k, v in (c.get("matmul_tflops") or {}).items()]
    if c.get("copy_gbps"):
        rows.append(["device-to-device copy (read + write)", fmt(c["copy_gbps"], ".4g"), "GB/s"])
    return table(["ceiling (measured in the same run)", "value", "unit"], rows) if rows else missing("ceilings")


def accuracy_by_op(acc, what) -> str:
    """Per op: the error-vs-T plot and the table of every point, or "not measured yet"."""
    refs = (acc.get("config") or {}).get("references") or {}
    parts = []
    for op in OPS:
        sub = op_doc(acc, op, ("rows",), baselines=False)
        if sub is None:
            parts.append(op_heading(op) + missing(f"{OP_LABELS[op]}: {what}"))
            continue
        parts.append(op_heading(op) + (note(f"Reference: {refs[op]}.") if refs.get(op) else "")
                     + img("error_vs_T", sub, f"{OP_LABELS[op]}: {what}")
                     + el("details", el("summary", "every point") + accuracy_table(sub)))
    return "".join(parts)


def point_html(p) -> str:
    """One point's rows: time, rates, peak memory and (when measured) the error vs float64 of each form."""
    acc = {r["form"]: r for r in p.get("accuracy") or []}
    rows = []
    for r in p.get("rows") or []:
        a = acc.get(r["form"]) if r.get("mode") == "fwd" else None
        err = "–"
        if a and a.get("status") == "ok":
            e = a["errors"]
            grads = {k: v for k, v in e.items() if k.startswith("d")}
            err = f"o {fmt(e.get('o'))}" + (f", {max(grads, key=grads.get)} {fmt(max(grads.values()))}"
                                             if grads else "")
            if a.get("T_measured") and a["T_measured"] != a.get("T"):
                err += f" (T={a['T_measured']})"
        elif a:
            err = f"{a.get('status')}: {a.get('reason', '')}"
        if r.get("status") == "ok":
            mem = r.get("mem_peak_bytes")
            rows.append([_label(p, r["form"]), r["mode"], fmt(r["ms"], ".4g"), fmt(r["tokens_per_s"] / 1e6, ".4g"),
                         fmt(r["tflops"], ".3g"), fmt(r["gbps"], ".4g"), fmt(mem / 2 ** 30, ".3g") if mem else "–",
                         err])
        else:
            rows.append([_label(p, r["form"]), r.get("mode"), "", "", "", "", "",
                         f"{r.get('status')}: {r.get('reason', '')}" + (f"; {err}" if err != "–" else "")])
    return table(["form", "mode", "ms", "Mtok/s", "TFLOP/s", "GB/s", "peak GiB", "error vs float64 (worst grad)"],
                 rows)


def accuracy_table(acc) -> str:
    rows = []
    for r in acc.get("rows") or []:
        if r.get("status") != "ok":
            rows.append([(acc.get("forms") or {}).get(r["form"], {}).get("label", r["form"]), r["dtype"], r["T"]]
                        + [""] * 4 + [f"{r['status']}: {r.get('reason', '')}"])
            continue
        e = r["errors"]
        grads = {k: v for k, v in e.items() if k.startswith("d")}
        worst_g = max(grads.values()) if grads else None
        rows.append([(acc.get("forms") or {}).get(r["form"], {}).get("label", r["form"]), r["dtype"], r["T"],
                     fmt(e.get("o")), fmt(e.get("final_state")),
                     fmt(worst_g) + (f" ({max(grads, key=grads.get)})" if grads else ""),
                     f"{fmt(r.get('bound_forward'))} / {fmt(r.get('bound_gradient'))}", r.get("reason", "ok")])
    return table(["form", "dtype", "T", "o", "final state", "worst gradient", "bounds fwd / grad", "note"], rows)


# --------------------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1320px;color:#222;
padding:0 16px;line-height:1.4}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.pass{background:#e3f5e1} td.fail{background:#fbe0e0;font-weight:600}
td.notrun{background:#fff4d6}
table.matrix td.pass,table.matrix td.fail{text-align:center;white-space:nowrap}
p.note{color:#555;font-size:13px} p.missing{color:#8a6d00;background:#fff8e0;padding:6px 10px;border-radius:4px}
img{max-width:100%;border:1px solid #eee} details{margin:8px 0} summary{cursor:pointer;color:#035}
nav a{margin-right:12px} .tag{display:inline-block;padding:1px 6px;border-radius:3px;font-size:12px;color:#fff}
.cpu{background:#2b7a3d} .gpu{background:#1f4e99}
"""


def section(sid, title, body) -> str:
    return el("section", el("h2", esc(title)) + body, id=sid)


def build(data=None, out=None) -> str:
    data = data or os.path.join(REPO, "reports", "data")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    cpu_path = os.path.join(data, "verification-cpu.json")
    cpu = load_json(cpu_path)
    cpu_acc_path = os.path.join(data, "accuracy-cpu.json")
    cpu_acc = load_json(cpu_acc_path)
    gpus = []
    for d in find_gpu_dirs(data):
        g = dict(dir=d, slug=os.path.basename(d))
        for key, fname in (("bench", "bench.json"), ("accuracy", "accuracy.json"), ("verification",
                                                                                      "verification-gpu.json")):
            p = os.path.join(d, fname)
            g[key] = load_json(p)
            g[key + "_path"] = p
        g["points"] = [p for p in (load_json(f) for f in sorted(glob.glob(os.path.join(d, "point-*.json")))) if p]
        g["first_calls"] = [(f, p) for f, p in ((f, load_json(f)) for f in
                                                sorted(glob.glob(os.path.join(d, "first-call-*.json")))) if p]
        g["machine"] = machine_from_record(load_json(os.path.join(d, "machine.json")))
        gpus.append(g)
    loose_gpu_path = os.path.join(data, "verification-gpu.json")
    loose_gpu = load_json(loose_gpu_path)
    tag_cpu = el("span", "CPU · fresh", class_="tag cpu")
    tag_gpu = el("span", "GPU · committed", class_="tag gpu")

    def gname(g):
        m = (g.get("bench") or {}).get("machine") or {}
        return m.get("gpu") or ((g.get("verification") or {}).get("meta") or {}).get("device") or g["slug"]

    body = {}
    # --- data sources
    src = []
    src.append([("html", tag_cpu), "property suite (CPU, Triton interpreter)",
                provenance(cpu_path, dict(created=mtime(cpu_path))) if cpu else NOT_MEASURED])
    src.append([("html", tag_cpu), "accuracy vs T (tiny, CPU)",
                provenance(cpu_acc_path, cpu_acc) if cpu_acc else NOT_MEASURED])
    for g in gpus:
        for key, what in (("bench", "speed sweep + decode"), ("accuracy", "accuracy vs T"),
                          ("verification", "property suite")):
            src.append([("html", tag_gpu), f"{what} on {gname(g)}",
                        provenance(g[key + "_path"], g[key]) if g.get(key) else NOT_MEASURED])
    if loose_gpu:
        src.append([("html", tag_gpu), f"property suite on {loose_gpu.get('meta', {}).get('device', '?')}",
                    provenance(loose_gpu_path)])
    if not gpus and not loose_gpu:
        src.append([("html", tag_gpu), "GPU speed, accuracy and verification", NOT_MEASURED])
    body["sources"] = (note(f"Built {now}. CPU data is regenerated by `python3 -m nox -s report` on the machine "
                            "that builds this page; GPU data is what `python3 -m nox -s bench` / `nox -s gpu` wrote "
                            "on a GPU machine and was committed under reports/data/<gpu>/.")
                       + table(["", "what", "file and provenance"], src))
    # --- machines
    import platform
    mparts = [el("h3", tag_cpu + " " + esc("this machine (CPU)")),
              table(None, [["CPU", cpu_model()],
                               ["platform", platform.platform()], ["python", platform.python_version()],
                               ["torch (property run)", (cpu or {}).get("meta", {}).get("torch", NOT_MEASURED)]])]
    for g in gpus:
        m = (g.get("bench") or {}).get("machine") or g.get("machine")
        mparts.append(el("h3", tag_gpu + " " + esc(gname(g))))
        mparts.append(table(None, machine_rows(m)) if m else missing(f"{gname(g)} machine record"))
    if not gpus:
        mparts.append(missing("GPU machine"))
    body["machines"] = "".join(mparts)
    # --- verification
    vparts = [el("h3", tag_cpu + " " + esc("CPU (Triton interpreter)")),
              verification_html(cpu, os.path.join(data, "verification-cpu.junit.xml"), "CPU")]
    gver = [(gname(g), g["verification"], os.path.join(g["dir"], "verification-gpu.junit.xml"))
            for g in gpus if g.get("verification")]
    if loose_gpu:
        gver.append((loose_gpu.get("meta", {}).get("device", "GPU"), loose_gpu,
                     os.path.join(data, "verification-gpu.junit.xml")))
    for name, doc, junit in gver:
        vparts.append(el("h3", tag_gpu + " " + esc(name)))
        vparts.append(verification_html(doc, junit, name))
    if not gver:
        vparts.append(el("h3", tag_gpu + " " + esc("GPU")) + missing("GPU verification"))
    body["verification"] = "".join(vparts)
    # --- tolerances
    try:
        trs = [[n, fmt(u, ".2g"), f"{f} u = {fmt(f * u, '.3g')}", f"{g_} u = {fmt(g_ * u, '.3g')}"]
               for n, u, f, g_ in _bounds()]
        from properties import tolerances
        doc_t = (tolerances.__doc__ or "").strip().split("\n\n")
        body["tolerances"] = (table(["dtype", "unit roundoff u", "forward bound", "gradient bound"], trs)
                              + note("Metric: ||x - x_ref|| / ||x_ref|| against the float64 reference on the same "
                                     "rounded inputs (properties/tolerances.py). " + " ".join(doc_t[-1:])))
    except Exception as e:
        body["tolerances"] = note(f"properties/tolerances.py could not be read: {e}")
    # --- accuracy
    aparts = []
    for g in gpus:
        if g.get("accuracy"):
            a = g["accuracy"]
            cfg = a.get("config", {})
            aparts.append(el("h3", tag_gpu + " " + esc(f"{gname(g)}: B={cfg.get('B')}, H={cfg.get('H')}, "
                                                       f"K={cfg.get('K')}, V={cfg.get('V')}")))
            aparts.append(accuracy_by_op(a, f"{gname(g)} error vs T"))
    if not any(g.get("accuracy") for g in gpus):
        aparts.append(el("h3", tag_gpu + " GPU") + missing("GPU error vs T")
                      + note("Ops to measure: " + ", ".join(OP_LABELS[o] for o in OPS) + "."))
    aparts.append(el("h3", tag_cpu + " " + esc("CPU (tiny shapes, Triton interpreter)")))
    if cpu_acc:
        cfg = cpu_acc.get("config", {})
        aparts.append(note(f"B={cfg.get('B')}, H={cfg.get('H')}, K={cfg.get('K')}, V={cfg.get('V')}; reference "
                           f"{cfg.get('reference')}."))
        aparts.append(accuracy_by_op(cpu_acc, "CPU error vs T"))
    else:
        aparts.append(missing("CPU error vs T"))
    body["accuracy"] = "".join(aparts)
    # --- speed sections
    benches = [g for g in gpus if g.get("bench") and g["bench"].get("sweep")]
    tp, mem, roof, peers, fc, dec = [], [], [], [], [], []
    for g in benches:
        b = g["bench"]
        h = el("h3", tag_gpu + " " + esc(gname(g)))
        tp_, mem_, roof_, peers_ = [h], [h], [h], [h]
        for op in OPS:
            sub = op_doc(b, op, ("sweep",))
            what = f"{OP_LABELS[op]} on {gname(g)}"
            if sub is None:
                for part, kind in ((tp_, "throughput"), (mem_, "memory"), (roof_, "roofline"), (peers_, "peers")):
                    part.append(op_heading(op) + missing(f"{what}: {kind}"))
                continue
            tp_.append(op_heading(op) + img("throughput_vs_T", sub, f"{what}: throughput vs T")
                       + img("tflops_vs_T", sub, f"{what}: TFLOP/s vs T")
                       + el("details", el("summary", "every point (with skip and error reasons)") + sweep_table(sub)))
            mem_.append(op_heading(op) + img("memory_vs_T", sub, f"{what}: memory vs T"))
            roof_.append(op_heading(op) + img("roofline", sub, f"{what}: roofline"))
            peers_.append(op_heading(op) + peer_html(sub))
        tp.append("".join(tp_))
        mem.append("".join(mem_)
                   + note("torch.cuda.max_memory_allocated over one call after a reset, minus what was allocated "
                          "before it: outputs, saved activations and workspace (fwd+bwd: also the gradients); the "
                          "inputs, shared by every form, are not counted. The process-wide peak is in the table "
                          "under Throughput."))
        roof.append("".join(roof_) + ceilings_html(b))
        peers.append("".join(peers_))
    for g in gpus:
        b = g.get("bench")
        if b and b.get("sweep") or g.get("points"):
            fc.append(el("h3", tag_gpu + " " + esc(gname(g)))
                      + first_call_html(b or {}, g.get("points") or [], g.get("first_calls") or []))
        if b and b.get("decode"):
            parts = [el("h3", tag_gpu + " " + esc(gname(g)))]
            for op in OPS:
                if op not in DECODE_OPS:
                    continue
                sub = op_doc(b, op, ("decode",), baselines=False)
                parts.append(op_heading(op) + (decode_html(sub) if sub else
                                               missing(f"{OP_LABELS[op]} decode on {gname(g)}")))
            dec.append("".join(parts))
    for g in gpus:
        for p in g.get("points") or []:
            pt = p.get("point", {})
            parts = []
            for op in OPS:
                sub = op_doc(p, op, ("rows", "accuracy"))
                if sub is None:
                    parts.append(op_heading(op) + missing(f"{OP_LABELS[op]} at this point"))
                    continue
                parts.append(op_heading(op) + point_html(sub))
            commit = short_commit((p.get("git") or {}).get("commit") or "?", 7)
            peers.append(el("h3", esc(f"{gname(g)}: --point " + ",".join(f"{k}={v}" for k, v in pt.items())
                                      + f" (commit {commit}, {str(p.get('created', '?'))[:16]})"))
                         + "".join(parts))
    no_gpu = note("Ops to measure: " + ", ".join(OP_LABELS[o] for o in OPS) + ", each beside fla and causal SDPA.")
    body["throughput"] = "".join(tp) or missing("GPU throughput") + no_gpu
    body["memory"] = "".join(mem) or missing("GPU memory")
    body["roofline"] = "".join(roof) or missing("GPU roofline")
    body["peers"] = "".join(peers) or missing("peer comparison (ours vs fla vs SDPA)") + no_gpu
    body["first-call"] = "".join(fc) or missing("first-call times")
    body["decode"] = "".join(dec) or missing("decode")
    body["goals"] = "".join(
        el("h3", tag_gpu + " " + esc(gname(g))) + goals_html(
            g.get("bench"), g.get("points"), g.get("first_calls", ()),
            [(gname(o), p) for o in gpus if o is not g for p in o.get("points") or []])
        for g in gpus if g.get("bench") or g.get("points")) or missing("performance goals")

    # --- conformance: the conformance records of every property run, and conformance-*.json runs (e.g. fla's)
    cparts = []
    runs = [(tag_cpu, "CPU (Triton interpreter)", cpu, os.path.join(data, "verification-cpu.junit.xml"))]
    runs += [(tag_gpu, name, doc, junit) for name, doc, junit in gver]
    for d in [data] + [g["dir"] for g in gpus]:
        for f in sorted(glob.glob(os.path.join(d, "conformance-*.json"))):
            where = "CPU" if d == data else os.path.basename(d)
            runs.append((tag_cpu if d == data else tag_gpu, f"{os.path.basename(f)} ({where})", load_json(f),
                         f[:-len(".json")] + ".junit.xml"))
    for tag, name, doc, junit in runs:
        if doc and any(r.get("impl") for r in doc.get("records") or []):
            cparts.append(el("h3", tag + " " + esc(name)) + conformance_html(doc, junit, name))
    body["conformance"] = "".join(cparts) or missing("conformance records")

    nav = el("nav", "".join(el("a", esc(t), href=f"#{s}") for s, t in SECTIONS))
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>deltacheck report</title>"
            f"<style>{CSS}</style></head><body>"
            + el("h1", "deltacheck: delta-rule kernels, verified and measured")
            + note("Triton kernels for the delta rule held to float64 references (properties/) and measured "
                   "beside flash-linear-attention and causal SDPA (benchmarks/).")
            + nav + "".join(section(s, t, body[s]) for s, t in SECTIONS) + "</body></html>\n")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(page)
    return page


def main(argv=None):
    p = argparse.ArgumentParser(prog="python3 -m reports.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "reports", "data"))
    p.add_argument("--out", default=os.path.join(REPO, "reports", "site", "index.html"))
    a = p.parse_args(argv)
    build(a.data, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
