"""Fault injection for the failure tests: ``MPIINFER_TEST_FAULT=WHERE:RANK`` makes that rank raise at WHERE.

WHERE is ``load`` (before the model loads) or ``step`` (at its first model step). Unset, this costs one
dictionary lookup.
"""
import os


def inject(where: str, rank: int) -> None:
    spec = os.environ.get("MPIINFER_TEST_FAULT")
    if spec and spec == f"{where}:{rank}":
        raise RuntimeError(f"injected fault at {where} on rank {rank}")
