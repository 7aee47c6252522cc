"""The remote checkpointer's save future completes on the thread that waits for it."""

import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError

import pytest

from olmo.remote_checkpoint import DoneWhenAwaited


def _finished_upload(value=None, error: BaseException | None = None):
    """A future completed on a pool thread, as RemoteCheckpointer's upload is."""

    def upload():
        if error is not None:
            raise error
        return value

    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(upload)
        fut.exception()  # wait, without raising
    return fut


def test_callbacks_run_on_the_waiting_thread_not_when_the_upload_ends():
    # olmo-core records a metric and calls post_checkpoint_saved in the done-callback; on the
    # upload thread that happens at a rank-dependent step (mismatched collectives).
    upload = _finished_upload(value=7)
    fut = DoneWhenAwaited(upload)
    calls: list[tuple[int, str]] = []
    fut.add_done_callback(lambda f: calls.append((f.result(), threading.current_thread().name)))
    assert upload.done() and not fut.done() and calls == []
    assert fut.result() == 7
    assert fut.done() and calls == [(7, threading.current_thread().name)]
    assert fut.result() == 7 and len(calls) == 1  # completes once


def test_a_failed_upload_raises_where_it_is_awaited():
    err = RuntimeError("upload failed")
    fut = DoneWhenAwaited(_finished_upload(error=err))
    assert not fut.done()
    with pytest.raises(RuntimeError, match="upload failed"):
        fut.result()
    assert fut.exception() is err


def test_a_timeout_leaves_it_pending_and_it_cannot_be_cancelled():
    release = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = DoneWhenAwaited(pool.submit(release.wait))
        with pytest.raises(FutureTimeoutError):
            fut.result(timeout=0.01)
        assert not fut.done() and not fut.cancel()
        release.set()
        assert fut.result() is True
