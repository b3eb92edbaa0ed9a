/*
 * polygate FFI runtime ABI.
 *
 * A runtime library exports:
 *
 *     int libffi_init(char *cfg, void *tq);
 *
 * polygate calls it once per (library, cfg) for the whole process. `cfg` is NULL or a
 * NUL-terminated buffer that is freed when libffi_init returns (copy what you keep; you may
 * modify it in place). Return 0 on success. Start your polling thread(s) and return quickly.
 *
 * Part 1 is lua-resty-ffi's ABI, unchanged: runtimes written for OpenResty load as they are.
 * Part 2 is polygate's extensions. Check for them at run time with
 * dlsym(RTLD_DEFAULT, "polygate_ffi_abi_version") before use, so the same runtime still loads
 * under hosts without them.
 *
 * Every function below may be called from any thread of the runtime.
 */
#ifndef POLYGATE_FFI_H
#define POLYGATE_FFI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Part 1: lua-resty-ffi ABI ------------------------------------------------------------ */

/* Blocks until a task is queued and returns it. Returns NULL once the runtime was unloaded and
 * every task queued before that was handed out: stop polling and never use `tq` again.
 * Under polygate several threads may poll one queue; each gets NULL at the end. */
void *ngx_http_lua_ffi_task_poll(void *tq);

/* The request bytes of a task (NUL-terminated as well; NULL for a nil request). `len` may be
 * NULL. Valid until the task is answered. */
char *ngx_http_lua_ffi_get_req(void *tsk, int *len);

/* Answers a task, exactly once. rc 0 = success. `rsp` is NULL or memory from malloc(); the host
 * frees it. rsp_len > 0: exact length. rsp_len == 0 with rsp != NULL: NUL-terminated (strlen).
 * Answering a task twice is undefined behaviour. */
void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);

/* ---- Part 2: polygate extensions ---------------------------------------------------------- */

#define POLYGATE_FFI_ABI_MAJOR 1
#define POLYGATE_FFI_ABI_MINOR 3

/* (major << 16) | minor. */
uint32_t polygate_ffi_abi_version(void);

/* Blocks until at least one task is queued; stores up to `max` tasks in `out` and returns how
 * many. Returns 0 once the runtime was unloaded (like NULL from task_poll). */
int polygate_ffi_task_poll_n(void *tq, void **out, int max);

/* Answers a task with an exact length (0 = empty; no strlen). `free_fn` releases `rsp` once the
 * host is done with it; NULL means free(). */
void polygate_ffi_respond2(void *tsk, int rc, char *rsp, size_t len, void (*free_fn)(void *));

/* 1 when the caller is gone (timed out, client disconnected): the answer will be discarded, so
 * the work may be skipped. The task must still be answered. */
int polygate_ffi_task_is_cancelled(void *tsk);

/* Milliseconds before the caller gives up, or -1 when the call has no deadline. */
int64_t polygate_ffi_task_remaining_ms(void *tsk);

/* ABI 1.1. Takes up to `max` queued tasks without blocking: returns how many, 0 when none is
 * queued (the queue's descriptor becomes readable when one is), -1 once the runtime was unloaded
 * (never touch `tq` again). For runtimes with an event loop of their own. */
int polygate_ffi_task_try_poll_n(void *tq, void **out, int max);

/* ABI 1.1. How many tasks wait to be polled, read without the queue's lock (a moment stale at
 * worst): for a poller that spins briefly before it parks. */
int polygate_ffi_task_queued(void *tq);

/* ABI 1.1. A descriptor that becomes readable when tasks are queued after try_poll_n returned 0,
 * and when the runtime is unloaded; -1 on error. The host owns it: wait on it (epoll, Go's
 * netpoller, libuv), reading it resets it (try_poll_n does too); never write or close it (dup it for a wrapper that
 * closes). */
int polygate_ffi_task_queue_fd(void *tq);

/* ABI 1.2. For a poller that just got 0 from try_poll_n: 1 when it runs on the CPU of the
 * queue's last post; it should then sched_yield() and call try_poll_n again instead of waiting
 * on the descriptor (the caller yields back after its next post), for a bounded time (the Go SDK:
 * 32 yields or 50 us). The descriptor is not signalled until that try_poll_n. 0 otherwise. */
int polygate_ffi_task_queue_handoff(void *tq);

/* ABI 1.3. From now on the host hands each task of `tq` to `call(ctx, tsk)` on the thread that
 * posts it (a gateway worker) instead of queueing it for a poller: for handlers that answer in
 * microseconds and never block. `call` answers the task exactly as a polled one (before it
 * returns, for the whole gain, or later from any thread). Inline calls that take over 1 ms four
 * times within a second turn them off for the runtime (logged): later tasks queue for its
 * pollers, so keep polling. 0 when registered; -1 when tq or call is NULL or an entry was
 * registered before. */
int polygate_ffi_task_queue_inline(void *tq, void (*call)(void *ctx, void *tsk), void *ctx);

/* Writes into polygate's log. level: 0 error, 1 warn, 2 info, 3 debug. len < 0: NUL-terminated. */
void polygate_ffi_log(int level, const char *msg, int len);

#ifdef __cplusplus
}
#endif

#endif /* POLYGATE_FFI_H */
