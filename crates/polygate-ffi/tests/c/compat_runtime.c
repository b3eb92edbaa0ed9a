/* A lua-resty-ffi runtime written against nothing but the three published declarations (no
 * polygate header), as a runtime built for OpenResty would be. Its behaviour comes from cfg:
 *   NULL or "echo"   answer the request bytes (empty request: malloc'd "\0" with length 0)
 *   "strlen"         answer strdup(request) with length 0 (the legacy strlen rule)
 *   "rc"             answer rc 7 with "bad input"
 *   "null"           answer rc 0 with a NULL response
 *   "hang"           never answer
 *   "stuck"          the poll thread blocks for 4 s on each task before answering it (so
 *                    the queue behind it fills up)
 *   "slow:<ms>"      answer each request from its own thread after <ms> milliseconds
 *   "plugin"         answer the ffi plugin with a continue action adding x-c-runtime: 1
 *   "fail:<rc>"      make libffi_init return <rc>
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void *ngx_http_lua_ffi_task_poll(void *tq);
char *ngx_http_lua_ffi_get_req(void *tsk, int *len);
void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);

struct rt { void *tq; char mode[32]; int ms; };

struct later { void *tsk; int ms; };

static void *answer_later(void *arg) {
    /* owns its own copy of what it needs: the runtime state may be freed on unload */
    struct later *a = arg;
    void *tsk = a->tsk;
    int ms = a->ms;
    free(a);
    usleep(ms * 1000);
    int len = 0;
    char *req = ngx_http_lua_ffi_get_req(tsk, &len);
    char *out = malloc(len > 0 ? len : 1);
    if (len > 0) memcpy(out, req, len); else out[0] = 0;
    ngx_http_lua_ffi_respond(tsk, 0, out, len);
    return NULL;
}

static void *poll_loop(void *arg) {
    struct rt *r = arg;
    for (;;) {
        void *tsk = ngx_http_lua_ffi_task_poll(r->tq);
        if (tsk == NULL) break;
        int len = 0;
        char *req = ngx_http_lua_ffi_get_req(tsk, &len);
        if (strcmp(r->mode, "hang") == 0) continue;
        if (strcmp(r->mode, "stuck") == 0) usleep(4000 * 1000);
        if (strcmp(r->mode, "slow") == 0) {
            struct later *a = malloc(sizeof *a);
            a->tsk = tsk; a->ms = r->ms;
            pthread_t t;
            pthread_create(&t, NULL, answer_later, a);
            pthread_detach(t);
            continue;
        }
        if (strcmp(r->mode, "strlen") == 0) { ngx_http_lua_ffi_respond(tsk, 0, strdup(req ? req : ""), 0); continue; }
        if (strcmp(r->mode, "rc") == 0) { ngx_http_lua_ffi_respond(tsk, 7, strdup("bad input"), 0); continue; }
        if (strcmp(r->mode, "null") == 0) { ngx_http_lua_ffi_respond(tsk, 0, NULL, 0); continue; }
        if (strcmp(r->mode, "plugin") == 0) {
            ngx_http_lua_ffi_respond(tsk, 0, strdup("{\"action\":\"continue\",\"set_headers\":{\"x-c-runtime\":\"1\"}}"), 0);
            continue;
        }
        char *out = malloc(len > 0 ? len : 1);
        if (len > 0) memcpy(out, req, len); else out[0] = 0;
        ngx_http_lua_ffi_respond(tsk, 0, out, len);
    }
    free(r);
    return NULL;
}

int libffi_init(char *cfg, void *tq) {
    struct rt *r = calloc(1, sizeof *r);
    r->tq = tq;
    strcpy(r->mode, "echo");
    if (cfg != NULL) {
        if (strncmp(cfg, "fail:", 5) == 0) { int rc = atoi(cfg + 5); free(r); return rc; }
        if (strncmp(cfg, "slow:", 5) == 0) { strcpy(r->mode, "slow"); r->ms = atoi(cfg + 5); }
        else { strncpy(r->mode, cfg, sizeof r->mode - 1); }
        cfg[0] = 'X'; /* the host's copy may be modified in place */
    }
    pthread_t t;
    if (pthread_create(&t, NULL, poll_loop, r) != 0) { free(r); return 2; }
    pthread_detach(t);
    return 0;
}
