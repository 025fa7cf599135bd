"""The service's log handler: lines written in batches, in order, none lost at close; request ids."""

from __future__ import annotations

import io
import logging
import os
import re
import time

from app.logs import _FORMAT, LineBuffer, _Formatter
from app.middleware import new_request_id


def _logger(stream: io.StringIO, **options: float) -> tuple[logging.Logger, LineBuffer]:
    handler = LineBuffer(stream, **options)  # type: ignore[arg-type]
    handler.setFormatter(_Formatter(_FORMAT))
    logger = logging.getLogger(f"test.logs.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, handler


def _wait_for(stream: io.StringIO, text: str, seconds: float = 5.0) -> float:
    started = time.monotonic()
    while text not in stream.getvalue():
        assert time.monotonic() - started < seconds, f"{text!r} not written within {seconds} s"
        time.sleep(0.005)
    return time.monotonic() - started


def test_info_lines_are_held_then_written_within_the_interval() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream, interval=0.2)
    logger.info("first")
    logger.info("second")
    assert stream.getvalue() == ""  # held
    waited = _wait_for(stream, "second")
    assert waited < 2.0
    lines = stream.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["first", "second"]
    handler.close()


def test_a_warning_writes_everything_before_it_at_once_in_order() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream, interval=60)
    logger.info("before")
    logger.warning("trouble")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO " + logger.name + " before")
    assert lines[1].endswith("WARNING " + logger.name + " trouble")
    handler.close()


def test_a_full_buffer_is_written_and_close_writes_the_rest() -> None:
    stream = io.StringIO()
    logger, handler = _logger(stream, interval=60, limit=1000)
    for i in range(12):  # lines of 100-140 characters: the 8th to 10th passes the limit
        logger.info("line %d %s", i, "x" * 60)
    written = stream.getvalue().count("\n")
    assert 7 <= written <= 10  # written when over the limit; the rest held
    handler.close()
    assert stream.getvalue().count("\n") == 12
    assert "line 11 " in stream.getvalue()


def test_lines_read_as_with_the_standard_formatter() -> None:
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "status=%d", (200,), None)
    assert _Formatter(_FORMAT).format(record) == logging.Formatter(_FORMAT).format(record)
    later = logging.LogRecord("app", logging.ERROR, __file__, 1, "x", None, None)
    later.created += 3.5  # another second: the cached date text is made again
    later.msecs = 500.0
    assert _Formatter(_FORMAT).format(later) == logging.Formatter(_FORMAT).format(later)


def test_request_ids_are_32_hex_digits_unique_and_differ_in_a_forked_child() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert child[:16] != next(iter(ids))[:16]


def test_a_line_written_directly_reads_as_through_logging() -> None:
    stream = io.StringIO()
    parent, handler = _logger(stream, interval=60)
    child = logging.getLogger(parent.name + ".access")
    child.handlers[:] = []
    assert handler.line(child, logging.INFO, 'status=200 path="/predict"')
    child.info('status=200 path="/predict"')
    handler.flush()
    direct, logged = stream.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert re.fullmatch(stamp + re.escape(f'INFO {child.name} status=200 path="/predict"'), direct)
    assert direct[23:] == logged[23:]  # all but the time
    # Anything else that would see the record: not written directly, logging decides.
    child.addFilter(lambda record: True)
    assert not handler.line(child, logging.INFO, "x")
    child.filters.clear()
    parent.addHandler(logging.NullHandler())
    assert not handler.line(child, logging.INFO, "x")
    handler.close()
