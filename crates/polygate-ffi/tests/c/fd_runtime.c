/*
 * A runtime with an event loop of its own (ABI 1.1): it waits for tasks with epoll on the
 * queue's descriptor and takes them with polygate_ffi_task_try_poll_n, never blocking in the
 * host; before parking it looks at polygate_ffi_task_queued for a moment. Echoes each request; stops when try_poll_n returns -1 (unloaded).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "polygate_ffi.h"

static void *loop(void *tq)
{
    int fd = polygate_ffi_task_queue_fd(tq);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (fd < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        abort();
    }
    void *tasks[16];
    for (;;) {
        int n = polygate_ffi_task_try_poll_n(tq, tasks, 16);
        if (n < 0) {
            break; /* unloaded: never touch tq again */
        }
        if (n == 0) {
            /* look at the lock-free count for a moment (what a spinning poller does), then
             * park: try_poll_n returned 0, so the descriptor is armed */
            for (int i = 0; i < 1000 && polygate_ffi_task_queued(tq) == 0; i++) {
            }
            if (polygate_ffi_task_queued(tq) > 0) {
                continue;
            }
            struct epoll_event got;
            epoll_wait(ep, &got, 1, -1);
            continue;
        }
        for (int i = 0; i < n; i++) {
            int len = 0;
            char *req = ngx_http_lua_ffi_get_req(tasks[i], &len);
            char *out = malloc(len > 0 ? len : 1);
            if (len > 0) {
                memcpy(out, req, len);
            }
            polygate_ffi_respond2(tasks[i], 0, out, (size_t)len, NULL);
        }
    }
    close(ep);
    return NULL;
}

int libffi_init(char *cfg, void *tq)
{
    (void)cfg;
    if ((polygate_ffi_abi_version() & 0xffff) < 1) {
        return 2;
    }
    pthread_t t;
    if (pthread_create(&t, NULL, loop, tq) != 0) {
        return 1;
    }
    pthread_detach(t);
    return 0;
}
