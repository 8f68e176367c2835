"""Fault injection for the failure tests: ``MPIINFER_TEST_FAULT=WHERE:RANK`` makes that rank raise at WHERE,
``MPIINFER_TEST_FAULT=WHERE:RANK:sleep=S`` makes it pause S seconds there instead, each time (a slow load, to
signal it; slow steps, so a job outlasts a time limit).  RANK ``*``: every rank.

WHERE is ``load`` (before the model loads) or ``step`` (every model step: a raise happens at the first). Unset,
this costs one dictionary lookup.
"""
import os
import time


def inject(where: str, rank: int) -> None:
    spec = os.environ.get("MPIINFER_TEST_FAULT")
    if not spec:
        return
    for who in (str(rank), "*"):
        if spec.startswith(f"{where}:{who}") and spec[len(f"{where}:{who}"):][:1] in ("", ":"):
            break
    else:
        return
    rest = spec[len(f"{where}:{who}"):]
    if rest.startswith(":sleep="):
        time.sleep(float(rest[len(":sleep="):]))
    elif not rest:
        raise RuntimeError(f"injected fault at {where} on rank {rank}")
