/*
 * A test runtime that depends on the host's threading the way lua-resty-ffi's loaders do.
 *
 * - Its first libffi_init keeps state bound to the calling thread (a pointer to that thread's
 *   thread-local variable, as the Java loader keeps the JNIEnv of the thread that created the
 *   JVM); every later libffi_init uses that state and aborts the process if it runs on another
 *   thread (the Java loader segfaults there); the poll thread reads it too.
 * - It records, for every libffi_init, whether it ran on the process's main thread
 *   (gettid() == getpid()) and answers every request with those counts.
 *
 * cfg: "slow" sleeps 2 s in libffi_init (a JVM starting); "fail" returns rc 7; "signals"
 * installs handlers for SIGTERM, SIGINT and SIGQUIT that end the process at once with status 143
 * (what the JVM and Node.js do), "late-signals" does the same 300 ms later from a thread of its
 * own; anything else is a name echoed back.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

extern void *ngx_http_lua_ffi_task_poll(void *tq);
extern char *ngx_http_lua_ffi_get_req(void *tsk, int *len);
extern void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);

static __thread int thread_state;
static int *bound_state; /* the first initialising thread's state */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int inits, inits_on_main, inits_elsewhere;

struct rt {
    void *tq;
    char name[64];
};

static void *poll_loop(void *arg)
{
    struct rt *rt = arg;
    for (;;) {
        void *tsk = ngx_http_lua_ffi_task_poll(rt->tq);
        if (tsk == NULL) {
            break;
        }
        int len = 0;
        char *req = ngx_http_lua_ffi_get_req(tsk, &len);
        char *out = malloc(512);
        pthread_mutex_lock(&lock);
        int n = snprintf(out, 512, "%s inits=%d main=%d elsewhere=%d state=%d req=%.*s", rt->name,
                         inits, inits_on_main, inits_elsewhere, *bound_state, len > 200 ? 200 : len,
                         req ? req : "");
        pthread_mutex_unlock(&lock);
        ngx_http_lua_ffi_respond(tsk, 0, out, n);
    }
    free(rt);
    return NULL;
}

static void die_now(int sig)
{
    (void)sig;
    _exit(143);
}

static void take_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = die_now;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGQUIT, &sa, NULL);
}

static void *take_signals_later(void *arg)
{
    (void)arg;
    usleep(300 * 1000);
    take_signals();
    return NULL;
}

int libffi_init(char *cfg, void *tq)
{
    pthread_mutex_lock(&lock);
    if (bound_state == NULL) {
        thread_state = 4242;
        bound_state = &thread_state;
    } else if (thread_state != 4242) {
        /* the thread-bound state belongs to another thread: what the Java loader's JNIEnv
         * does here is undefined; make it certain */
        fprintf(stderr, "threadbound: libffi_init on a thread other than the first one\n");
        abort();
    }
    int on_main = syscall(SYS_gettid) == getpid();
    inits++;
    if (on_main) {
        inits_on_main++;
    } else {
        inits_elsewhere++;
    }
    pthread_mutex_unlock(&lock);
    if (cfg != NULL && strcmp(cfg, "slow") == 0) {
        sleep(2);
    }
    if (cfg != NULL && strcmp(cfg, "signals") == 0) {
        take_signals();
    }
    if (cfg != NULL && strcmp(cfg, "late-signals") == 0) {
        pthread_t t;
        pthread_create(&t, NULL, take_signals_later, NULL);
        pthread_detach(t);
    }
    if (cfg != NULL && strcmp(cfg, "fail") == 0) {
        return 7;
    }
    struct rt *rt = calloc(1, sizeof(*rt));
    rt->tq = tq;
    snprintf(rt->name, sizeof(rt->name), "%s", cfg ? cfg : "nil");
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, poll_loop, rt) != 0) {
        free(rt);
        return 1;
    }
    return 0;
}
