"""The runner's choice of generator processes when one saturates (pure logic)."""

from __future__ import annotations

from dataclasses import replace

from pigeon.bench.runner import MAX_AUTO_PROCS, more_procs
from pigeon.bench.scenarios import Params

SATURATED = {"generator_saturated": True}
NOT_SATURATED = {"generator_saturated": False}


def test_a_saturated_generator_gets_twice_the_processes_up_to_the_cap() -> None:
    params = replace(Params(), procs=1)
    assert more_procs(SATURATED, params, fixed=False, single=False) == 2
    assert more_procs(SATURATED, replace(params, procs=3), fixed=False, single=False) == 6
    near = replace(params, procs=MAX_AUTO_PROCS - 1)
    assert more_procs(SATURATED, near, fixed=False, single=False) == MAX_AUTO_PROCS
    at_cap = replace(params, procs=MAX_AUTO_PROCS)
    assert more_procs(SATURATED, at_cap, fixed=False, single=False) is None


def test_no_rerun_when_not_saturated_fixed_by_the_user_or_single_shard() -> None:
    params = replace(Params(), procs=1)
    assert more_procs(NOT_SATURATED, params, fixed=False, single=False) is None
    assert more_procs({}, params, fixed=False, single=False) is None  # CPU unknown
    assert more_procs(SATURATED, params, fixed=True, single=False) is None  # --procs given
    assert more_procs(SATURATED, params, fixed=False, single=True) is None  # e.g. offline
