"""polygate_ffi: write polygate runtimes in Python.

A runtime module names an init function in its cfg ("module,init"); the loader calls
init(cfg, tq). The simplest runtime hands the queue to serve():

    import polygate_ffi

    def echo(req):            # bytes in; bytes, str, None, (rc, data) or a JSON value out
        return req

    def init(cfg, tq):
        return polygate_ffi.serve(tq, echo)

A handler may be an ``async def`` function: it then runs on one asyncio event loop thread for
the process (event_loop()). An exception answers rc 1 with the traceback. ``with_task=True``
passes a Task (request, is_cancelled(), remaining_ms()) instead of the bytes.

The primitives (poll, poll_n, get_req, respond, is_cancelled, remaining_ms, cfg_str, host_log)
come from the loader; runtimes written for lua-resty-ffi with cffi keep working unchanged.
"""

import asyncio
import inspect
import json
import os
import sys
import threading
import traceback

_threads = []
_loop = None
_loop_thread = None
_loop_lock = threading.Lock()


class Task:
    """One request: its bytes and what polygate knows about its caller."""

    __slots__ = ("ptr", "request")

    def __init__(self, ptr, request):
        self.ptr = ptr
        self.request = request

    def is_cancelled(self):
        """The caller is gone (timed out, disconnected): the answer will be discarded."""
        return is_cancelled(self.ptr)

    def remaining_ms(self):
        """Milliseconds the caller still waits, or -1 without a deadline."""
        return remaining_ms(self.ptr)


def _encode(out):
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], int):
        rc, data = out
    else:
        rc, data = 0, out
    if data is None:
        return rc, None
    if isinstance(data, (bytes, bytearray, memoryview)):
        return rc, bytes(data)
    if isinstance(data, str):
        return rc, data.encode()
    return rc, json.dumps(data).encode()


def _answer(ptr, out):
    try:
        rc, data = _encode(out)
    except BaseException:
        respond(ptr, 1, traceback.format_exc())
        return
    respond(ptr, rc, data)


def _finish(ptr, fut):
    if fut.cancelled():
        respond(ptr, 1, "cancelled")
        return
    exc = fut.exception()
    if exc is not None:
        respond(ptr, 1, "".join(traceback.format_exception(exc)))
        return
    _answer(ptr, fut.result())


def event_loop():
    """The asyncio event loop async handlers run on: one thread for the process."""
    global _loop, _loop_thread
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            t = threading.Thread(target=loop.run_forever, name="polygate-asyncio", daemon=True)
            t.start()
            _loop, _loop_thread = loop, t
        return _loop


def serve(tq, handler, *, threads=1, batch=32, with_task=False):
    """Answers the queue tq with handler on `threads` poll threads; returns 0 (the rc for init).

    A plain handler runs on the poll thread (use threads > 1 for handlers that block); an
    ``async def`` handler runs on event_loop(), so one poll thread serves any number of
    concurrent calls.
    """
    is_async = inspect.iscoroutinefunction(handler)
    loop = event_loop() if is_async else None

    def run():
        while True:
            ptrs = poll_n(tq, batch)
            if not ptrs:
                return
            for p in ptrs:
                req = get_req(p)
                arg = Task(p, req) if with_task else req
                if is_async:
                    try:
                        fut = asyncio.run_coroutine_threadsafe(handler(arg), loop)
                    except BaseException:
                        respond(p, 1, traceback.format_exc())
                        continue
                    fut.add_done_callback(lambda f, p=p: _finish(p, f))
                    continue
                try:
                    out = handler(arg)
                except BaseException:
                    respond(p, 1, traceback.format_exc())
                    continue
                _answer(p, out)

    for i in range(max(1, int(threads))):
        t = threading.Thread(target=run, name="polygate-poll-%d" % i, daemon=True)
        _threads.append(t)
        t.start()
    return 0


def _add_path(d):
    d = os.path.abspath(d)
    if d not in sys.path:
        sys.path.insert(0, d)


def _add_venv(venv):
    import site

    v = sys.version_info
    sp = os.path.join(os.path.abspath(venv), "lib", "python%d.%d" % (v[0], v[1]), "site-packages")
    if not os.path.isdir(sp):
        raise ImportError("virtualenv %s has no %s (built for another Python?)" % (venv, sp))
    if sp not in sys.path:
        site.addsitedir(sp)
        sys.path.remove(sp)
        sys.path.insert(0, sp)


def _import(name, reload):
    import importlib
    import importlib.util

    mod = sys.modules.get(name)
    if mod is None:
        return importlib.import_module(name)
    if reload:
        # a cached .pyc written in the same second as an edit of the same size would be taken
        # as current: drop it so the edited source is compiled again
        src = getattr(mod, "__file__", None)
        if src and src.endswith(".py"):
            try:
                os.remove(importlib.util.cache_from_source(src))
            except OSError:
                pass
        importlib.invalidate_caches()
        return importlib.reload(mod)
    return mod


def _before_exit(timeout):
    """At exit: wait up to `timeout` seconds for the poll threads (polygate unloaded every
    runtime, so they are ending) and other non-daemon threads. True when none is left inside
    Python; the interpreter is then finalised."""
    import time

    deadline = time.monotonic() + timeout
    if _loop is not None:
        _loop.call_soon_threadsafe(_loop.stop)
    pending = [t for t in _threads if t.is_alive()]
    pending += [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t is not threading.current_thread()
    ]
    if _loop_thread is not None:
        pending.append(_loop_thread)
    for t in pending:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t for t in pending if t.is_alive()]
    # threading._shutdown would wait for non-daemon threads forever
    threading._shutdown = lambda: None
    return not left
