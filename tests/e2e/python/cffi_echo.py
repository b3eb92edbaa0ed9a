"""A runtime written the way lua-resty-ffi's Python runtimes are: cffi bindings to the host's C
functions and a daemon poll thread (no polygate_ffi)."""
import threading

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
void *malloc(size_t size);
void *memcpy(void *dest, const void *src, size_t n);
void *ngx_http_lua_ffi_task_poll(void *tq);
char *ngx_http_lua_ffi_get_req(void *tsk, int *len);
void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);
"""
)
C = ffi.dlopen(None)


def _loop(tq):
    n = ffi.new("int *")
    while True:
        task = C.ngx_http_lua_ffi_task_poll(ffi.cast("void *", tq))
        if task == ffi.NULL:
            break
        req = C.ngx_http_lua_ffi_get_req(task, n)
        data = b"cffi:" + ffi.buffer(req, n[0])[:]
        out = C.malloc(len(data))
        C.memcpy(out, data, len(data))
        C.ngx_http_lua_ffi_respond(task, 0, out, len(data))


def init(cfg, tq):
    t = threading.Thread(target=_loop, args=(tq,), daemon=True)
    t.start()
    return 0
