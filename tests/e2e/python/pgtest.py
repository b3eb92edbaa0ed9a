"""Runtimes for the Python loader's end-to-end tests (tests/e2e/python_rt.rs), one init function
per behaviour, all on polygate_ffi.serve."""
import asyncio
import atexit

import polygate_ffi


def _cfg(cfg):
    return polygate_ffi.cfg_str(cfg) or ""


def init_echo(cfg, tq):
    return polygate_ffi.serve(tq, lambda req: req)


def init_tagged(cfg, tq):
    tag = _cfg(cfg).encode()
    return polygate_ffi.serve(tq, lambda req: tag + b":" + req)


def init_async(cfg, tq):
    async def handler(req):
        await asyncio.sleep(0.001 * (len(req) % 7))
        return b"async:" + req

    return polygate_ffi.serve(tq, handler)


def init_slow(cfg, tq):
    async def handler(req):
        polygate_ffi.host_log(1, "slow handler started " + req.decode())
        await asyncio.sleep(0.5)
        return b"slow:" + req

    return polygate_ffi.serve(tq, handler)


def init_rc(cfg, tq):
    return polygate_ffi.serve(tq, lambda req: (5, "five"))


def init_json(cfg, tq):
    return polygate_ffi.serve(tq, lambda req: {"len": len(req), "ok": True})


def init_raise(cfg, tq):
    def handler(req):
        raise ValueError("bad request " + req.decode())

    return polygate_ffi.serve(tq, handler)


def init_async_raise(cfg, tq):
    async def handler(req):
        raise KeyError("async " + req.decode())

    return polygate_ffi.serve(tq, handler)


def init_fail(cfg, tq):
    return 3


def init_boom(cfg, tq):
    raise RuntimeError("init exploded")


def init_task(cfg, tq):
    def handler(task):
        return "%s %s %s" % (task.remaining_ms() > 0, task.is_cancelled(), task.request.decode())

    return polygate_ffi.serve(tq, handler, with_task=True)


def init_gc(cfg, tq):
    # allocates enough per call to keep Python's garbage collector busy
    def handler(req):
        junk = [{"i": i, "s": str(i) * 4} for i in range(2000)]
        cycle = []
        cycle.append(cycle)
        return req + b":" + str(len(junk)).encode()

    return polygate_ffi.serve(tq, handler)


def init_atexit(cfg, tq):
    path = _cfg(cfg)

    def mark():
        with open(path, "w") as f:
            f.write("finalized")

    atexit.register(mark)
    return polygate_ffi.serve(tq, lambda req: req)
