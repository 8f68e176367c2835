"""The progress report: the input's size as its total, the rate over the last interval, the time left."""
import logging
import time

from mpiinfer.config import RunConfig
from mpiinfer.coordinator import Progress, count_records
from mpiinfer.messages import Result


def test_log_line_has_total_interval_rate_and_time_left(caplog, monkeypatch):
    logger = logging.getLogger("mpiinfer")
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    clock = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    try:
        p = Progress(done_before=10, quiet=False, every=30.0, total=1010)
        clock[0] += 100.0                         # a slow start (loading, the first prefill)...
        p.add(Result(0, 0, token_ids=[1]))
        caplog.clear()
        for _ in range(50):                       # ...then 50 records in 10 s: 5 records/s
            clock[0] += 0.2
            p.add(Result(0, 0, token_ids=[1, 2]))
        clock[0] += 40.0
        p.add(Result(0, 0, token_ids=[1, 2]))
    finally:
        logger.removeHandler(caplog.handler)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs and "62/1010 records done" in msgs[-1], msgs
    # the rate is that of the last interval (51 records in 50 s), not diluted by the start
    assert "1.0 records/s" in msgs[-1] and "left" in msgs[-1], msgs


def test_count_records(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"prompt": "x"}\n' * 7)
    b.write_text('{"prompt": "y"}\n{"prompt": "z"}')
    assert count_records(RunConfig(model="m", inputs=(str(a), str(b)), output="o.jsonl")) == 9
    assert count_records(RunConfig(model="m", inputs=("-",), output="o.jsonl")) is None
