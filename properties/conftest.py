"""Hypothesis profiles and the verification record.

Profiles (one test body for quick and deep runs), chosen by DELTACHECK_PROFILE:
  ci        fast and deterministic (derandomize), what `nox -s tests` runs
  dev       the default: a few more random examples
  thorough  many examples, for `nox -s properties` and the GPU
"""
import json
import os
import platform

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=6, derandomize=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("DELTACHECK_PROFILE", "dev"))

# `record` is function-scoped on purpose: it appends to one list across all hypothesis examples of a test.
_RECORDS = []


@pytest.fixture
def record(request):
    """record(name, err, bound, **fields): keep a measured error for the verification report."""
    def _record(name, err, bound, **fields):
        _RECORDS.append(dict(test=request.node.nodeid, name=name, err=err, bound=bound,
                             **{k: str(v) for k, v in fields.items()}))
    return _record


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("DELTACHECK_RECORD")
    if not path or not _RECORDS:
        return
    meta = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
                torch=torch.__version__, profile=os.environ.get("DELTACHECK_PROFILE", "dev"),
                exitstatus=int(exitstatus))
    with open(path, "w") as f:
        json.dump(dict(meta=meta, records=_RECORDS), f, indent=1)
