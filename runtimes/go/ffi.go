// Package ffi writes polygate runtimes in Go (also loadable by OpenResty's lua-resty-ffi).
//
// A runtime is a c-shared library:
//
//	package main
//
//	import "polygate.dev/ffi"
//
//	func init() {
//		ffi.Handle("", func(cfg string) (ffi.Handler, ffi.Options, error) {
//			return func(req []byte) (int, []byte) { return 0, req }, ffi.Options{}, nil
//		})
//	}
//
//	func main() {}
//
// built with `go build -buildmode=c-shared -o libmy_runtime.so .`.
//
// One process should load one Go library: Go does not support several Go runtimes in one
// process, and a Go library can never be unloaded. To serve several handlers from one library,
// register each under a name and select it with the cfg: "name" or "name:rest" (rest is passed
// to the factory); a handler registered under "" receives any other cfg whole.
package ffi

/*
#cgo LDFLAGS: -shared -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern void *ngx_http_lua_ffi_task_poll(void *tq);
extern char *ngx_http_lua_ffi_get_req(void *tsk, int *len);
extern void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);

typedef uint32_t (*pg_version_fn)(void);
typedef int (*pg_poll_n_fn)(void *, void **, int);
typedef void (*pg_respond2_fn)(void *, int, char *, size_t, void (*)(void *));
typedef int (*pg_cancelled_fn)(void *);
typedef int64_t (*pg_remaining_fn)(void *);
typedef int (*pg_try_poll_n_fn)(void *, void **, int);
typedef int (*pg_queue_fd_fn)(void *);
typedef int (*pg_queued_fn)(void *);
typedef int (*pg_handoff_fn)(void *);

static pg_poll_n_fn pg_poll_n_p;
static pg_respond2_fn pg_respond2_p;
static pg_cancelled_fn pg_cancelled_p;
static pg_remaining_fn pg_remaining_p;
static pg_try_poll_n_fn pg_try_poll_n_p;
static pg_queue_fd_fn pg_queue_fd_p;
static pg_queued_fn pg_queued_p;
static pg_handoff_fn pg_handoff_p;

// Looks up polygate's extensions; 0 when the host does not have them (e.g. OpenResty).
static int pg_detect(void) {
	pg_version_fn v = (pg_version_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_abi_version");
	pg_poll_n_p = (pg_poll_n_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_poll_n");
	pg_respond2_p = (pg_respond2_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_respond2");
	pg_cancelled_p = (pg_cancelled_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_is_cancelled");
	pg_remaining_p = (pg_remaining_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_remaining_ms");
	if (!v || !pg_poll_n_p || !pg_respond2_p || !pg_cancelled_p || !pg_remaining_p) return 0;
	if ((v() >> 16) != 1) return 0;
	// ABI 1.1: a non-blocking poll and a readiness descriptor (optional)
	if ((v() & 0xffff) >= 1) {
		pg_try_poll_n_p = (pg_try_poll_n_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_try_poll_n");
		pg_queue_fd_p = (pg_queue_fd_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_queue_fd");
		pg_queued_p = (pg_queued_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_queued");
	}
	// ABI 1.2: the same-CPU hand-off (optional)
	if ((v() & 0xffff) >= 2) {
		pg_handoff_p = (pg_handoff_fn)dlsym(RTLD_DEFAULT, "polygate_ffi_task_queue_handoff");
	}
	return 1;
}
static int pg_has_fd(void) { return pg_try_poll_n_p != NULL && pg_queue_fd_p != NULL && pg_queued_p != NULL; }
static int pg_queued(void *tq) { return pg_queued_p(tq); }
static int pg_handoff(void *tq) { return pg_handoff_p != NULL ? pg_handoff_p(tq) : 0; }
static int pg_try_poll_n(void *tq, void **out, int max) { return pg_try_poll_n_p(tq, out, max); }
static int pg_queue_fd(void *tq) { return pg_queue_fd_p(tq); }
static int pg_poll_n(void *tq, void **out, int max) { return pg_poll_n_p(tq, out, max); }
static int pg_cancelled(void *t) { return pg_cancelled_p(t); }
static int64_t pg_remaining(void *t) { return pg_remaining_p(t); }

// Answers with a malloc'd copy of buf (the host frees it).
static void pg_respond(int ext, void *t, int rc, const void *buf, size_t len) {
	char *out = malloc(len > 0 ? len : 1);
	if (out == NULL) { ngx_http_lua_ffi_respond(t, rc, NULL, 0); return; }
	if (len > 0) memcpy(out, buf, len); else out[0] = 0;
	if (ext) pg_respond2_p(t, rc, out, len, NULL);
	else ngx_http_lua_ffi_respond(t, rc, out, (int)len); // len 0: "\0", the strlen rule
}
*/
import "C"

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Handler answers one request: rc 0 means success.
type Handler func(req []byte) (rc int, rsp []byte)

// AsyncHandler answers one request by calling respond exactly once, from any goroutine.
type AsyncHandler func(req []byte, respond func(rc int, rsp []byte))

// TaskHandler answers one request seen as a [Task]: it can tell whether the caller is gone
// and how long it will still wait. Each request runs on its own goroutine.
type TaskHandler func(t *Task) (rc int, rsp []byte)

// TaskFactory builds a [TaskHandler] from the cfg given to libffi_init.
type TaskFactory func(cfg string) (TaskHandler, Options, error)

// Task is one request as a [TaskHandler] sees it. It is valid until the handler returns.
type Task struct {
	t       task
	req     []byte
	cancels []context.CancelFunc
}

// Request is the request's bytes.
func (t *Task) Request() []byte { return t.req }

// Cancelled reports whether the caller is gone (timed out, client disconnected): its answer
// will be discarded, so the work may stop early. Always false under lua-resty-ffi.
func (t *Task) Cancelled() bool { return t.t.cancelled() }

// Remaining is how long the caller will still wait; ok is false when the call has no
// deadline (or the host is lua-resty-ffi, which has none).
func (t *Task) Remaining() (d time.Duration, ok bool) {
	if !ext {
		return 0, false
	}
	ms := int64(C.pg_remaining(t.t.p))
	if ms < 0 {
		return 0, false
	}
	return time.Duration(ms) * time.Millisecond, true
}

// CancelCheckInterval is how often a [Task.Context] asks the host whether the caller is gone.
var CancelCheckInterval = 5 * time.Millisecond

// Context returns a context whose deadline is the caller's and which is cancelled once the
// host reports the caller gone (checked every [CancelCheckInterval]). Pass it to the
// libraries the handler calls (net/http, database/sql). Cancel is called when the handler
// returns.
func (t *Task) Context() context.Context {
	ctx := context.Background()
	var cancel context.CancelFunc
	if d, ok := t.Remaining(); ok {
		ctx, cancel = context.WithTimeout(ctx, d)
	} else {
		ctx, cancel = context.WithCancel(ctx)
	}
	t.cancels = append(t.cancels, cancel)
	if ext {
		go func() {
			tick := time.NewTicker(CancelCheckInterval)
			defer tick.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-tick.C:
					if t.t.cancelled() {
						cancel()
						return
					}
				}
			}
		}()
	}
	return ctx
}

// Options tune the poll loop.
type Options struct {
	// Pollers is the number of goroutines polling the queue (several only under polygate;
	// lua-resty-ffi allows one). Default 1.
	Pollers int
	// Batch is the number of tasks taken per poll under polygate. Default 32.
	Batch int
}

// Factory builds a handler from the cfg given to libffi_init.
type Factory func(cfg string) (Handler, Options, error)

// AsyncFactory builds an asynchronous handler.
type AsyncFactory func(cfg string) (AsyncHandler, Options, error)

// entry is a registered factory: synchronous handlers run inline on the polling goroutine
// (the fast path: no goroutine hand-off between poll and respond); asynchronous ones get a
// goroutine per request.
type entry struct {
	sync  Factory
	async AsyncFactory
	task  TaskFactory
}

var (
	mu        sync.Mutex
	factories = map[string]entry{}
	ext       = C.pg_detect() == 1
)

// Handle registers a synchronous handler factory under name ("" = default). The handler runs
// on a polling goroutine; use Options.Pollers for concurrency, or HandleAsync for handlers
// that wait on I/O.
func Handle(name string, f Factory) {
	mu.Lock()
	defer mu.Unlock()
	factories[name] = entry{sync: f}
}

// HandleAsync registers an asynchronous handler factory under name ("" = default): each
// request runs on its own goroutine and may be answered from any goroutine.
func HandleAsync(name string, f AsyncFactory) {
	mu.Lock()
	defer mu.Unlock()
	factories[name] = entry{async: f}
}

// HandleTask registers a [TaskHandler] factory under name ("" = default): each request runs
// on its own goroutine and can see cancellation and the remaining time.
func HandleTask(name string, f TaskFactory) {
	mu.Lock()
	defer mu.Unlock()
	factories[name] = entry{task: f}
}

// HasExtensions reports whether the host offers polygate's extensions.
func HasExtensions() bool { return ext }

func pick(cfg string) (entry, string, error) {
	mu.Lock()
	defer mu.Unlock()
	name, rest := cfg, ""
	if i := strings.IndexByte(cfg, ':'); i >= 0 {
		name, rest = cfg[:i], cfg[i+1:]
	}
	if f, ok := factories[name]; ok && name != "" {
		return f, rest, nil
	}
	if f, ok := factories[""]; ok {
		return f, cfg, nil
	}
	return entry{}, "", fmt.Errorf("no handler registered for cfg %q", cfg)
}

//export libffi_init
func libffi_init(cfg *C.char, tq unsafe.Pointer) C.int {
	s := ""
	if cfg != nil {
		s = C.GoString(cfg) // copied: the host frees cfg when we return
	}
	f, rest, err := pick(s)
	if err != nil {
		fmt.Fprintln(os.Stderr, "polygate ffi:", err)
		return 1
	}
	var h handlers
	var opts Options
	switch {
	case f.sync != nil:
		h.sync, opts, err = f.sync(rest)
	case f.async != nil:
		h.async, opts, err = f.async(rest)
	default:
		h.task, opts, err = f.task(rest)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "polygate ffi: init:", err)
		return 2
	}
	if opts.Pollers < 1 || !ext {
		opts.Pollers = 1
	}
	if opts.Batch < 1 {
		opts.Batch = 32
	}
	for i := 0; i < opts.Pollers; i++ {
		go pollLoop(tq, h, opts)
	}
	return 0
}

type task struct{ p unsafe.Pointer }

func (t task) request() []byte {
	var n C.int
	p := C.ngx_http_lua_ffi_get_req(t.p, &n)
	if p == nil || n <= 0 {
		return nil
	}
	return C.GoBytes(unsafe.Pointer(p), n)
}

func (t task) respond(rc int, rsp []byte) {
	e := C.int(0)
	if ext {
		e = 1
	}
	var p unsafe.Pointer
	if len(rsp) > 0 {
		p = unsafe.Pointer(&rsp[0])
	}
	// the C side copies rsp into malloc'd memory before returning
	C.pg_respond(e, t.p, C.int(rc), p, C.size_t(len(rsp)))
}

func (t task) cancelled() bool {
	return ext && C.pg_cancelled(t.p) != 0
}

// PollSpin is how long an idle poller keeps looking for tasks, after a batch of one task,
// before it parks in Go's netpoller (polygate 1.1), on machines with more than one CPU. It
// catches a sequential caller's next call without a trip through the netpoller. 0 turns it
// off; POLYGATE_POLLER_SPIN_US sets the default.
var PollSpin = spinFromEnv()

func spinFromEnv() time.Duration {
	if v, err := strconv.Atoi(os.Getenv("POLYGATE_POLLER_SPIN_US")); err == nil && v >= 0 {
		return time.Duration(v) * time.Microsecond
	}
	return 20 * time.Microsecond
}

var spinAllowed = runtime.NumCPU() > 1

// HotWait is how long a poller of synchronous handlers (polygate 1.1) keeps waiting for tasks
// on the queue's descriptor while holding its P, before it parks in Go's netpoller. A parked
// poller releases its P: once every P is idle, Go's sysmon thread sleeps, and the next cgo
// call wakes it again; with the netpoller's own wake-up and the hand-offs that follow, this
// cost the Go threads 3-5.5 us of CPU per request under gateway load, against 1.3-1.8 us when
// waiting this way (the echo example's "continue" handler, one gateway worker). At most
// GOMAXPROCS-1 pollers of the process wait holding a P, so other goroutines always have one.
// 0 turns it off; POLYGATE_POLLER_HOT_MS sets the default (50 ms).
var HotWait = hotFromEnv()

func hotFromEnv() time.Duration {
	if v, err := strconv.Atoi(os.Getenv("POLYGATE_POLLER_HOT_MS")); err == nil && v >= 0 {
		return time.Duration(v) * time.Millisecond
	}
	return 50 * time.Millisecond
}

// hotWaiters counts the pollers waiting while holding a P.
var hotWaiters atomic.Int32

// hotTick bounds one wait on the descriptor: the idle time is counted in these steps.
const hotTick = 5 * time.Millisecond

// pollFd is struct pollfd.
type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

// poller takes tasks from a queue: with polygate 1.1 it waits for them on the queue's
// descriptor, first holding its P (see [HotWait]), then in Go's netpoller (no thread blocked
// in a cgo call, so the Go scheduler starts no other thread); with polygate 1.0 it blocks in
// poll_n; elsewhere in task_poll.
type poller struct {
	tq    unsafe.Pointer
	batch int
	buf   unsafe.Pointer // room for batch task pointers (C memory, reused)
	rc    syscall.RawConn
	file  *os.File
	last  int // size of the previous batch
	// the host's descriptor (-1: none, or it failed: the blocking poll_n)
	rawfd int
	// hot waiting (synchronous handlers only): whether this poller may, whether it holds one
	// of the hotWaiters places, and how long it has waited in vain
	hotOK bool
	hot   bool
	idle  time.Duration
}

func newPoller(tq unsafe.Pointer, batch int, hotOK bool) *poller {
	p := &poller{tq: tq, batch: batch, rawfd: -1, hotOK: hotOK}
	if !ext {
		return p
	}
	p.buf = C.malloc(C.size_t(batch) * C.size_t(unsafe.Sizeof(uintptr(0))))
	if C.pg_has_fd() == 1 {
		p.rawfd = int(C.pg_queue_fd(tq)) // the host owns it; -1 when it has none
	}
	return p
}

// register puts a duplicate of the descriptor (non-blocking like the original) in Go's
// netpoller, for parking; false when it cannot.
func (p *poller) register() bool {
	if p.rc != nil {
		return true
	}
	dup, err := syscall.Dup(p.rawfd)
	if err != nil {
		return false
	}
	syscall.CloseOnExec(dup)
	f := os.NewFile(uintptr(dup), "polygate-queue")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return false
	}
	p.rc, p.file = rc, f
	return true
}

// unregister takes the duplicate out of the netpoller: while the poller waits hot, every
// signal of the descriptor would also wake a thread parked in the netpoller for nothing.
func (p *poller) unregister() {
	if p.file != nil {
		p.file.Close()
		p.rc, p.file = nil, nil
	}
}

func (p *poller) close() {
	p.cool()
	p.unregister()
	if p.buf != nil {
		C.free(p.buf)
	}
}

func (p *poller) take(n int) []task {
	ptrs := unsafe.Slice((*unsafe.Pointer)(p.buf), p.batch)
	tasks := make([]task, n)
	for i := 0; i < n; i++ {
		tasks[i] = task{ptrs[i]}
	}
	return tasks
}

// next waits for tasks; empty once the runtime was unloaded.
func (p *poller) next() []task {
	if !ext {
		t := C.ngx_http_lua_ffi_task_poll(p.tq)
		if t == nil {
			return nil
		}
		return []task{{t}}
	}
	for {
		if p.rawfd < 0 {
			n := int(C.pg_poll_n(p.tq, (*unsafe.Pointer)(p.buf), C.int(p.batch)))
			return p.take(n)
		}
		n := int(C.pg_try_poll_n(p.tq, (*unsafe.Pointer)(p.buf), C.int(p.batch)))
		// after a batch of one (a sequential caller) on the caller's CPU: hand the CPU over
		if n == 0 && p.last == 1 {
			n = p.handOff()
		}
		// spin only after a batch of one: a sequential caller; under load batches are larger
		// and the spin would take CPU from the gateway
		if n == 0 && spinAllowed && p.last == 1 && PollSpin > 0 {
			// a sequential caller's next call usually comes within microseconds: look again
			// for a moment before parking (never on a single CPU, where it would only delay
			// the caller)
			// (the queued count is read without the queue's lock, which stays the callers')
			deadline := time.Now().Add(PollSpin)
			for C.pg_queued(p.tq) == 0 && time.Now().Before(deadline) {
				runtime.Gosched()
			}
			n = int(C.pg_try_poll_n(p.tq, (*unsafe.Pointer)(p.buf), C.int(p.batch)))
		}
		if n < 0 {
			return nil
		}
		if n > 0 {
			p.last = n
			p.idle = 0
			return p.take(n)
		}
		p.last = 0
		if p.waitHot() {
			continue
		}
		// nothing queued: park until the descriptor is readable (the host signals it on the
		// next post or at unload); the next poll resets it
		var err error = syscall.EBADF
		if p.register() {
			err = p.rc.Read(func(fd uintptr) bool {
				var b [8]byte
				_, err := syscall.Read(int(fd), b[:])
				return err != syscall.EAGAIN
			})
		}
		if err != nil {
			// the descriptor failed: fall back to the blocking poll
			p.unregister()
			p.rawfd = -1
		}
	}
}

// handOffYields and handOffTime bound the same-CPU hand-off (see handOff): on an otherwise
// idle CPU each yield returns at once.
const (
	handOffYields = 32
	handOffTime   = 50 * time.Microsecond
)

// handOff (polygate 1.2), for a poller that just found the queue empty: while it runs on the
// CPU of the queue's last post (every thread on one CPU, or the kernel put them together), it
// yields that CPU to the caller and polls again, instead of waiting on the descriptor; the
// caller yields back after its next post. A sequential caller's round trip then costs a yield
// on each side instead of a descriptor write, a wake-up and a trip through Go's netpoller. The
// yield is a raw system call: the goroutine keeps its P, for at most handOffYields yields or
// handOffTime. Returns what the last poll returned (0: nothing came, wait as usual; the last
// poll armed the descriptor again).
func (p *poller) handOff() int {
	var start time.Time
	for i := 0; i < handOffYields; i++ {
		if C.pg_handoff(p.tq) != 1 {
			return 0
		}
		if i == 0 {
			start = time.Now()
		}
		syscall.RawSyscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
		n := int(C.pg_try_poll_n(p.tq, (*unsafe.Pointer)(p.buf), C.int(p.batch)))
		if n != 0 || time.Since(start) > handOffTime {
			return n
		}
	}
	return 0
}

// waitHot waits up to hotTick for the descriptor without giving up the P (a raw system call:
// to Go's scheduler this goroutine keeps running, so sysmon never goes to sleep and no other
// thread is woken when tasks come). False when the poller should park in the netpoller
// instead: hot waiting is off or not allowed, every place is taken, or it waited HotWait in
// vain. The wait ends early on a signal, so a stop-the-world (which preempts with one) never
// waits for it.
func (p *poller) waitHot() bool {
	if !p.hotOK || p.rawfd < 0 || HotWait <= 0 {
		return false
	}
	if !p.hot {
		limit := int32(runtime.GOMAXPROCS(0) - 1)
		for {
			n := hotWaiters.Load()
			if n >= limit {
				return false
			}
			if hotWaiters.CompareAndSwap(n, n+1) {
				break
			}
		}
		p.hot, p.idle = true, 0
		p.unregister()
	}
	if p.idle >= HotWait {
		p.cool()
		return false
	}
	fds := [1]pollFd{{fd: int32(p.rawfd), events: 0x1 /* POLLIN */}}
	ts := syscall.NsecToTimespec(int64(hotTick))
	_, _, errno := syscall.RawSyscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&fds[0])), 1,
		uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
	const pollErr, pollNval = 0x8, 0x20
	if errno == 0 && fds[0].revents == 0 {
		p.idle += hotTick // timed out
	} else if (errno != 0 && errno != syscall.EINTR) || fds[0].revents&(pollErr|pollNval) != 0 {
		// the descriptor failed: the netpoller reports it
		p.cool()
		p.hotOK = false
		return false
	}
	return true
}

// cool gives back this poller's place among the hot waiters.
func (p *poller) cool() {
	if p.hot {
		p.hot = false
		hotWaiters.Add(-1)
	}
}

// handlers holds the one handler a runtime was built with.
type handlers struct {
	sync  Handler
	async AsyncHandler
	task  TaskHandler
}

func pollLoop(tq unsafe.Pointer, h handlers, opts Options) {
	// only inline handlers wait holding a P: the others' work runs on goroutines that need one
	p := newPoller(tq, opts.Batch, h.sync != nil)
	defer p.close()
	for {
		tasks := p.next()
		if len(tasks) == 0 {
			return // unloaded: never touch tq again
		}
		for _, t := range tasks {
			if t.cancelled() {
				t.respond(1, []byte("cancelled"))
				continue
			}
			req := t.request()
			switch {
			case h.sync != nil:
				runInline(t, h.sync, req)
			case h.async != nil:
				runAsync(t, h.async, req)
			default:
				runTask(t, h.task, req)
			}
		}
	}
}

func runInline(t task, h Handler, req []byte) {
	answered := false
	defer func() {
		if r := recover(); r != nil && !answered {
			t.respond(1, []byte(fmt.Sprint("handler panicked: ", r)))
		}
	}()
	rc, rsp := h(req)
	answered = true
	t.respond(rc, rsp)
}

func runTask(t task, h TaskHandler, req []byte) {
	go func() {
		tk := &Task{t: t, req: req}
		answered := false
		defer func() {
			for _, c := range tk.cancels {
				c()
			}
			if r := recover(); r != nil && !answered {
				t.respond(1, []byte(fmt.Sprint("handler panicked: ", r)))
			}
		}()
		rc, rsp := h(tk)
		answered = true
		t.respond(rc, rsp)
	}()
}

func runAsync(t task, h AsyncHandler, req []byte) {
	var once sync.Once
	respond := func(rc int, rsp []byte) {
		once.Do(func() { t.respond(rc, rsp) })
	}
	go func() {
		defer func() {
			if r := recover(); r != nil {
				respond(1, []byte(fmt.Sprint("handler panicked: ", r)))
			}
		}()
		h(req, respond)
	}()
}
