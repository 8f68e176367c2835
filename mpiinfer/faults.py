"""Fault injection for the failure tests: ``MPIINFER_TEST_FAULT=WHERE:RANK`` makes that rank raise at WHERE,
``MPIINFER_TEST_FAULT=WHERE:RANK:sleep=S`` makes it pause S seconds there instead (a slow load, to signal it).

WHERE is ``load`` (before the model loads) or ``step`` (at its first model step). Unset, this costs one
dictionary lookup.
"""
import os
import time


def inject(where: str, rank: int) -> None:
    spec = os.environ.get("MPIINFER_TEST_FAULT")
    if not spec or not spec.startswith(f"{where}:{rank}"):
        return
    rest = spec[len(f"{where}:{rank}"):]
    if rest.startswith(":sleep="):
        time.sleep(float(rest[len(":sleep="):]))
    elif not rest:
        raise RuntimeError(f"injected fault at {where} on rank {rank}")
