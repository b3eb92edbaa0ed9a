/* A runtime using polygate's extensions: two threads batch-poll one queue, answers use exact
 * lengths, and tasks whose caller is gone are skipped. cfg:
 *   "batch"          answer "<n>:<request>" where n is the size of the batch the task came in
 *   "cancel"         wait until the caller gives up, then count it and answer rc 99
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <stdatomic.h>
#include "polygate_ffi.h"

static atomic_int cancelled_seen;
static atomic_int pollers_done;

int ext_cancelled_seen(void) { return atomic_load(&cancelled_seen); }
int ext_pollers_done(void) { return atomic_load(&pollers_done); }

struct rt { void *tq; int cancel_mode; };

static void *poll_loop(void *arg) {
    struct rt *r = arg;
    void *batch[16];
    for (;;) {
        int n = polygate_ffi_task_poll_n(r->tq, batch, 16);
        if (n == 0) break;
        for (int i = 0; i < n; i++) {
            void *tsk = batch[i];
            if (r->cancel_mode) {
                while (!polygate_ffi_task_is_cancelled(tsk)) usleep(2000);
                atomic_fetch_add(&cancelled_seen, 1);
                polygate_ffi_log(2, "task cancelled by the host", -1);
                polygate_ffi_respond2(tsk, 99, NULL, 0, NULL);
                continue;
            }
            int len = 0;
            char *req = ngx_http_lua_ffi_get_req(tsk, &len);
            char *out = malloc(len + 16);
            int m = snprintf(out, 16, "%d:", n);
            memcpy(out + m, req, len);
            polygate_ffi_respond2(tsk, 0, out, (size_t)(m + len), free);
        }
    }
    atomic_fetch_add(&pollers_done, 1);
    free(r);
    return NULL;
}

int libffi_init(char *cfg, void *tq) {
    if (polygate_ffi_abi_version() >> 16 != POLYGATE_FFI_ABI_MAJOR) return 3;
    for (int i = 0; i < 2; i++) {
        struct rt *r = calloc(1, sizeof *r);
        r->tq = tq;
        r->cancel_mode = cfg != NULL && strcmp(cfg, "cancel") == 0;
        pthread_t t;
        pthread_create(&t, NULL, poll_loop, r);
        pthread_detach(t);
    }
    return 0;
}
