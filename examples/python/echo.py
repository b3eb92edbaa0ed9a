"""The smallest Python runtime: answers each request with its own bytes.

    ngx.load_ffi("ffi_python3", "echo,init")       -- with examples/python on PYTHONPATH
    ngx.load_ffi("ffi_python3", "examples/python/echo,init")
"""
import polygate_ffi


def echo(req):
    return req


def init(cfg, tq):
    return polygate_ffi.serve(tq, echo)


def init_continue(cfg, tq):
    """An empty answer for the ffi plugin (continue unchanged): the cheapest plugin round trip."""
    return polygate_ffi.serve(tq, lambda req: None)
