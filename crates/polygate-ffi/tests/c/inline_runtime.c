/* A runtime with an inline entry (polygate ABI 1.3) beside its poll thread. The poll thread
 * answers "poll:<request>"; the inline entry, by cfg:
 *   "inline"   answers "inline:<request>" before returning, and records the calling thread
 *   "slow"     sleeps 2 ms, then answers "inline:<request>" (the host turns inline calls off)
 *   "later"    answers "later:<request>" 20 ms later from a thread of its own
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "polygate_ffi.h"

static atomic_long last_tid;

long inline_last_tid(void) { return atomic_load(&last_tid); }

struct rt { void *tq; char mode[16]; };

static void answer(void *tsk, const char *prefix) {
    int len = 0;
    char *req = ngx_http_lua_ffi_get_req(tsk, &len);
    size_t p = strlen(prefix);
    char *out = malloc(p + (size_t)len + 1);
    memcpy(out, prefix, p);
    if (len > 0) memcpy(out + p, req, (size_t)len);
    polygate_ffi_respond2(tsk, 0, out, p + (size_t)len, free);
}

static void *answer_later(void *tsk) {
    usleep(20 * 1000);
    answer(tsk, "later:");
    return NULL;
}

static void inline_call(void *ctx, void *tsk) {
    struct rt *r = ctx;
    atomic_store(&last_tid, (long)syscall(SYS_gettid));
    if (strcmp(r->mode, "slow") == 0) usleep(2000);
    if (strcmp(r->mode, "later") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, answer_later, tsk);
        pthread_detach(t);
        return;
    }
    answer(tsk, "inline:");
}

static void *poll_loop(void *arg) {
    struct rt *r = arg;
    void *tsk;
    while ((tsk = ngx_http_lua_ffi_task_poll(r->tq)) != NULL) answer(tsk, "poll:");
    return NULL; /* r stays: the inline entry may still be running */
}

int libffi_init(char *cfg, void *tq) {
    if (polygate_ffi_abi_version() < ((1u << 16) | 3)) return 3;
    struct rt *r = calloc(1, sizeof *r);
    r->tq = tq;
    strncpy(r->mode, cfg != NULL ? cfg : "inline", sizeof r->mode - 1);
    if (polygate_ffi_task_queue_inline(tq, inline_call, r) != 0) return 4;
    if (polygate_ffi_task_queue_inline(tq, inline_call, r) != -1) return 5; /* once only */
    pthread_t t;
    if (pthread_create(&t, NULL, poll_loop, r) != 0) return 2;
    pthread_detach(t);
    return 0;
}
