// polygate's Node.js loader (libffi_nodejs.so): Node.js runtimes in-process through the
// lua-resty-ffi ABI.
//
// ngx.load_ffi("ffi_nodejs", "module[?],func[,cfg]"), or the ffi plugin with the same lib and
// cfg, requires `module` (resolved from the working directory, then NODE_PATH; `?` evicts it
// from the require cache first) and calls module[func](cfg, tq), where tq is a BigInt (as
// lua-resty-ffi's loader passes it) and cfg the rest of the string after the second comma (it
// may contain commas). The function returns the rc (0 = loaded).
//
// One Node.js environment per process, started by the first libffi_init on a thread of its own
// and kept: Node supports one environment per process and cannot start again after a teardown.
// Start-up is deterministic: libffi_init waits on a condition variable until the environment's
// bootstrap has registered its init function, and each init is a call into the event loop
// through a thread-safe function (no sockets, no sleeps). Node is initialised without its
// signal handling (kNoDefaultSignalHandling: polygate keeps SIGTERM/SIGINT and other runtimes'
// handlers stay) and without touching stdio (kNoStdioInitialization).
//
// `require('polygate_ffi')` is the SDK: serve(tq, handler) starts a native poll thread for the
// queue that hands batches of tasks to the event loop; a handler is `async (req, task) => out`
// where out is a Buffer, a string, null, {rc, body} (an object with a numeric rc), or another
// value sent as JSON.
//
// The embedding code is kept to this file so a newer libnode can replace Debian's Node 18.

#include <dlfcn.h>
#include <node.h>
#include <node_api.h>
#include <uv.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

extern "C" {
void *ngx_http_lua_ffi_task_poll(void *tq);
char *ngx_http_lua_ffi_get_req(void *tsk, int *len);
void ngx_http_lua_ffi_respond(void *tsk, int rc, char *rsp, int rsp_len);
}

namespace {

// ---- polygate's extensions, looked up at run time (absent under OpenResty) ----------------

typedef uint32_t (*version_fn)(void);
typedef int (*poll_n_fn)(void *, void **, int);
typedef void (*respond2_fn)(void *, int, char *, size_t, void (*)(void *));
typedef int (*cancelled_fn)(void *);
typedef int64_t (*remaining_fn)(void *);
typedef void (*log_fn)(int, const char *, int);

struct Ext {
  bool ok = false;
  poll_n_fn poll_n = nullptr;
  respond2_fn respond2 = nullptr;
  cancelled_fn cancelled = nullptr;
  remaining_fn remaining = nullptr;
  log_fn log = nullptr;
};

const Ext &ext() {
  static Ext e = [] {
    Ext x;
    auto v = reinterpret_cast<version_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_abi_version"));
    x.poll_n = reinterpret_cast<poll_n_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_task_poll_n"));
    x.respond2 = reinterpret_cast<respond2_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_respond2"));
    x.cancelled =
        reinterpret_cast<cancelled_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_task_is_cancelled"));
    x.remaining =
        reinterpret_cast<remaining_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_task_remaining_ms"));
    x.log = reinterpret_cast<log_fn>(dlsym(RTLD_DEFAULT, "polygate_ffi_log"));
    x.ok = v && x.poll_n && x.respond2 && x.cancelled && x.remaining && x.log && (v() >> 16) == 1;
    return x;
  }();
  return e;
}

void log_line(int level, const std::string &msg) {
  if (ext().ok) {
    ext().log(level, msg.data(), static_cast<int>(msg.size()));
  } else {
    fprintf(stderr, "ffi_nodejs: %s\n", msg.c_str());
  }
}

// Answers a task with a malloc'd copy of data (the host frees it).
void respond(void *task, int rc, const char *data, size_t len, bool has_data) {
  char *out = nullptr;
  if (has_data) {
    out = static_cast<char *>(malloc(len > 0 ? len : 1));
    if (out == nullptr) {
      has_data = false;
    } else {
      if (len > 0) memcpy(out, data, len);
      if (len == 0) out[0] = 0;
    }
  }
  if (ext().ok) {
    ext().respond2(task, rc, has_data ? out : nullptr, has_data ? len : 0, nullptr);
  } else {
    ngx_http_lua_ffi_respond(task, rc, has_data ? out : nullptr, has_data ? static_cast<int>(len) : 0);
  }
}

// ---- the environment ----------------------------------------------------------------------

struct InitReq {
  std::string module, func, cfg;
  bool reload = false;
  uint64_t tq = 0;
  int rc = 1;
  bool done = false;
  std::string error;
};

std::mutex mu;
std::condition_variable cv;
bool started = false;
bool ready = false;      // the bootstrap registered its init function
bool failed = false;     // the environment could not start
bool exited = false;     // the node thread finished
std::string start_error;
napi_threadsafe_function init_tsfn = nullptr;
std::atomic<node::Environment *> g_env{nullptr};

// `v` as text (String(v) in JavaScript); false when it cannot be converted.
bool to_text(napi_env env, napi_value v, std::string *out) {
  napi_value str;
  if (napi_coerce_to_string(env, v, &str) != napi_ok) return false;
  size_t n = 0;
  napi_get_value_string_utf8(env, str, nullptr, 0, &n);
  out->assign(n, '\0');
  napi_get_value_string_utf8(env, str, out->data(), n + 1, &n);
  return true;
}

std::string pending_exception(napi_env env) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) != napi_ok || !pending) return "";
  napi_value exc;
  if (napi_get_and_clear_last_exception(env, &exc) != napi_ok) return "exception";
  napi_value stack;
  napi_value text = exc;
  bool is_error = false;
  napi_is_error(env, exc, &is_error);
  if (is_error && napi_get_named_property(env, exc, "stack", &stack) == napi_ok) text = stack;
  std::string s;
  return to_text(env, text, &s) ? s : "exception";
}

void finish_init(const std::shared_ptr<InitReq> &r) {
  {
    std::lock_guard<std::mutex> g(mu);
    r->done = true;
  }
  cv.notify_all();
}

// Runs on the event loop: calls the bootstrap's init function.
void call_init(napi_env env, napi_value js_cb, void *, void *data) {
  auto holder = static_cast<std::shared_ptr<InitReq> *>(data);
  std::shared_ptr<InitReq> r = *holder;
  delete holder;
  if (env == nullptr) {
    r->error = "the Node.js environment stopped";
    finish_init(r);
    return;
  }
  napi_value argv[5], undef, result;
  napi_get_undefined(env, &undef);
  napi_create_string_utf8(env, r->module.c_str(), r->module.size(), &argv[0]);
  napi_create_string_utf8(env, r->func.c_str(), r->func.size(), &argv[1]);
  napi_create_string_utf8(env, r->cfg.c_str(), r->cfg.size(), &argv[2]);
  napi_create_bigint_uint64(env, r->tq, &argv[3]);
  napi_get_boolean(env, r->reload, &argv[4]);
  if (napi_call_function(env, undef, js_cb, 5, argv, &result) != napi_ok) {
    r->error = pending_exception(env);
    r->rc = 1;
  } else {
    int32_t rc = 1;
    if (napi_get_value_int32(env, result, &rc) != napi_ok) {
      r->error = "the init function did not return a number";
      rc = 1;
    }
    r->rc = rc;
  }
  finish_init(r);
}

// binding.registerInit(fn)
napi_value js_register_init(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value fn;
  napi_get_cb_info(env, info, &argc, &fn, nullptr, nullptr);
  napi_value name;
  napi_create_string_utf8(env, "polygate_ffi.init", NAPI_AUTO_LENGTH, &name);
  napi_threadsafe_function tsfn;
  if (napi_create_threadsafe_function(env, fn, nullptr, name, 0, 1, nullptr, nullptr, nullptr,
                                      call_init, &tsfn) != napi_ok) {
    napi_throw_error(env, nullptr, "cannot create the init function");
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> g(mu);
    init_tsfn = tsfn;
    ready = true;
  }
  cv.notify_all();
  return nullptr;
}

// ---- serving a queue ----------------------------------------------------------------------

struct Batch {
  std::vector<void *> tasks;
};

bool get_u64(napi_env env, napi_value v, uint64_t *out) {
  bool lossless = true;
  if (napi_get_value_bigint_uint64(env, v, out, &lossless) == napi_ok) return true;
  double d;
  if (napi_get_value_double(env, v, &d) == napi_ok) {
    *out = static_cast<uint64_t>(d);
    return true;
  }
  return false;
}

// Runs on the event loop: hands each task of a batch to the JS callback (task, request).
void call_handler(napi_env env, napi_value js_cb, void *, void *data) {
  std::unique_ptr<Batch> b(static_cast<Batch *>(data));
  for (void *task : b->tasks) {
    if (env == nullptr) {
      const char *m = "the Node.js environment stopped";
      respond(task, 1, m, strlen(m), true);
      continue;
    }
    napi_handle_scope scope;
    napi_open_handle_scope(env, &scope);
    napi_value argv[2], undef, result;
    napi_get_undefined(env, &undef);
    napi_create_bigint_uint64(env, reinterpret_cast<uint64_t>(task), &argv[0]);
    int len = 0;
    char *req = ngx_http_lua_ffi_get_req(task, &len);
    if (req == nullptr) {
      napi_get_null(env, &argv[1]);
    } else {
      napi_create_buffer_copy(env, static_cast<size_t>(len > 0 ? len : 0), req, nullptr, &argv[1]);
    }
    if (napi_call_function(env, undef, js_cb, 2, argv, &result) != napi_ok) {
      std::string e = pending_exception(env);
      respond(task, 1, e.data(), e.size(), true);
    }
    napi_close_handle_scope(env, scope);
  }
}

// binding.serve(tq, callback): a native thread polls the queue and hands batches to the loop.
// Threads that poll a runtime's queue reach into the environment through a thread-safe
// function. Once the environment's loop has ended (unload, or the process exiting), it is torn
// down on its own thread: a poll thread must then leave the function alone (libuv aborts on a
// closed handle). `env_alive` changes, and the function is used, only under `tsfn_mu`.
std::mutex tsfn_mu;
bool env_alive = true;

napi_value js_serve(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  uint64_t tq = 0;
  if (argc < 2 || !get_u64(env, argv[0], &tq) || tq == 0) {
    napi_throw_type_error(env, nullptr, "serve(tq, handler): tq must be the queue given to init");
    return nullptr;
  }
  napi_value name;
  napi_create_string_utf8(env, "polygate_ffi.serve", NAPI_AUTO_LENGTH, &name);
  napi_threadsafe_function tsfn;
  if (napi_create_threadsafe_function(env, argv[1], nullptr, name, 0, 1, nullptr, nullptr, nullptr,
                                      call_handler, &tsfn) != napi_ok) {
    napi_throw_error(env, nullptr, "cannot create the handler function");
    return nullptr;
  }
  // the environment stays alive anyway (the init function holds it); this one must not keep it
  napi_unref_threadsafe_function(env, tsfn);
  std::thread([tsfn, tq] {
    void *q = reinterpret_cast<void *>(tq);
    std::vector<void *> buf(64);
    for (;;) {
      auto b = std::make_unique<Batch>();
      if (ext().ok) {
        int n = ext().poll_n(q, buf.data(), static_cast<int>(buf.size()));
        if (n <= 0) break;
        b->tasks.assign(buf.begin(), buf.begin() + n);
      } else {
        void *t = ngx_http_lua_ffi_task_poll(q);
        if (t == nullptr) break;
        b->tasks.push_back(t);
      }
      Batch *raw = b.release();
      napi_status st = napi_closing;
      {
        // the queue is unbounded: the call never blocks while the lock is held
        std::lock_guard<std::mutex> g(tsfn_mu);
        if (env_alive) st = napi_call_threadsafe_function(tsfn, raw, napi_tsfn_blocking);
      }
      if (st != napi_ok) {
        for (void *t : raw->tasks) {
          const char *m = "the Node.js environment stopped";
          respond(t, 1, m, strlen(m), true);
        }
        delete raw;
      }
    }
    // unloaded: never touch the queue again
    std::lock_guard<std::mutex> g(tsfn_mu);
    if (env_alive) napi_release_threadsafe_function(tsfn, napi_tsfn_release);
  }).detach();
  return nullptr;
}

// binding.respond(task, rc, data)
napi_value js_respond(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  uint64_t task = 0;
  int32_t rc = 0;
  if (argc < 2 || !get_u64(env, argv[0], &task) || task == 0 ||
      napi_get_value_int32(env, argv[1], &rc) != napi_ok) {
    napi_throw_type_error(env, nullptr, "respond(task, rc, data)");
    return nullptr;
  }
  void *t = reinterpret_cast<void *>(task);
  napi_valuetype type = napi_undefined;
  if (argc >= 3) napi_typeof(env, argv[2], &type);
  if (argc < 3 || type == napi_undefined || type == napi_null) {
    respond(t, rc, nullptr, 0, false);
    return nullptr;
  }
  bool is_buffer = false, is_typed = false;
  napi_is_buffer(env, argv[2], &is_buffer);
  napi_is_typedarray(env, argv[2], &is_typed);
  if (is_buffer) {
    void *data;
    size_t len;
    napi_get_buffer_info(env, argv[2], &data, &len);
    respond(t, rc, static_cast<const char *>(data), len, true);
  } else if (is_typed) {
    napi_typedarray_type tt;
    size_t len;
    void *data;
    napi_value ab;
    size_t off;
    napi_get_typedarray_info(env, argv[2], &tt, &len, &data, &ab, &off);
    respond(t, rc, static_cast<const char *>(data), len, true);
  } else {
    std::string s;
    if (!to_text(env, argv[2], &s)) {
      respond(t, 1, nullptr, 0, false);
      return nullptr;
    }
    respond(t, rc, s.data(), s.size(), true);
  }
  return nullptr;
}

napi_value js_is_cancelled(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a;
  napi_get_cb_info(env, info, &argc, &a, nullptr, nullptr);
  uint64_t task = 0;
  bool c = argc == 1 && get_u64(env, a, &task) && task != 0 && ext().ok &&
           ext().cancelled(reinterpret_cast<void *>(task)) != 0;
  napi_value out;
  napi_get_boolean(env, c, &out);
  return out;
}

napi_value js_remaining_ms(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value a;
  napi_get_cb_info(env, info, &argc, &a, nullptr, nullptr);
  uint64_t task = 0;
  int64_t ms = -1;
  if (argc == 1 && get_u64(env, a, &task) && task != 0 && ext().ok)
    ms = ext().remaining(reinterpret_cast<void *>(task));
  napi_value out;
  napi_create_int64(env, ms, &out);
  return out;
}

napi_value js_log(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  napi_get_cb_info(env, info, &argc, argv, nullptr, nullptr);
  int32_t level = 2;
  if (argc >= 1) napi_get_value_int32(env, argv[0], &level);
  std::string s;
  if (argc >= 2 && to_text(env, argv[1], &s)) log_line(level, s);
  return nullptr;
}

napi_value binding_init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"registerInit", nullptr, js_register_init, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"serve", nullptr, js_serve, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"respond", nullptr, js_respond, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"isCancelled", nullptr, js_is_cancelled, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"remainingMs", nullptr, js_remaining_ms, nullptr, nullptr, nullptr, napi_default, nullptr},
      {"log", nullptr, js_log, nullptr, nullptr, nullptr, napi_default, nullptr},
  };
  napi_define_properties(env, exports, sizeof(props) / sizeof(props[0]), props);
  napi_value has_ext;
  napi_get_boolean(env, ext().ok, &has_ext);
  napi_set_named_property(env, exports, "hasExtensions", has_ext);
  return exports;
}

// The environment's main script: the public require, the polygate_ffi SDK module and the init
// function libffi_init calls.
const char *BOOTSTRAP = R"JS(
const Module = require('module');
const binding = process._linkedBinding('polygate_ffi');
const publicRequire = Module.createRequire(process.cwd() + '/');
globalThis.require = publicRequire;

function encode(v) {
  if (v === undefined || v === null) return [0, null];
  if (typeof v === 'object' && !Buffer.isBuffer(v) && !(v instanceof Uint8Array) &&
      typeof v.rc === 'number') {
    const body = v.body;
    return [v.rc | 0, body === undefined || body === null ? null :
      (typeof body === 'string' || Buffer.isBuffer(body) || body instanceof Uint8Array) ? body :
      JSON.stringify(body)];
  }
  if (typeof v === 'string' || Buffer.isBuffer(v) || v instanceof Uint8Array) return [0, v];
  return [0, JSON.stringify(v)];
}

function fail(task, e) {
  binding.respond(task, 1, String((e && e.stack) || e));
}

function answer(task, v) {
  let rc, body;
  try { [rc, body] = encode(v); } catch (e) { fail(task, e); return; }
  binding.respond(task, rc, body);
}

class Task {
  constructor(ptr, request) { this.ptr = ptr; this.request = request; }
  isCancelled() { return binding.isCancelled(this.ptr); }
  remainingMs() { return Number(binding.remainingMs(this.ptr)); }
}

const sdk = {
  hasExtensions: binding.hasExtensions,
  // serve(tq, handler): handler(req: Buffer|null, task: Task) returns (or resolves to) a Buffer,
  // a string, null, {rc, body} (numeric rc), or a value sent as JSON; a throw answers rc 1 with
  // the stack.
  serve(tq, handler) {
    binding.serve(tq, (ptr, req) => {
      let out;
      try { out = handler(req, new Task(ptr, req)); } catch (e) { fail(ptr, e); return; }
      if (out && typeof out.then === 'function') {
        out.then((v) => answer(ptr, v), (e) => fail(ptr, e));
      } else {
        answer(ptr, out);
      }
    });
    return 0;
  },
  respond: binding.respond,
  isCancelled: binding.isCancelled,
  remainingMs: (t) => Number(binding.remainingMs(t)),
  log: binding.log,
};

const sdkModule = new Module('polygate_ffi', null);
sdkModule.exports = sdk;
sdkModule.loaded = true;
Module._cache['polygate_ffi'] = sdkModule;
const resolve = Module._resolveFilename;
Module._resolveFilename = function (request, ...rest) {
  if (request === 'polygate_ffi') return 'polygate_ffi';
  return resolve.call(this, request, ...rest);
};

binding.registerInit((mod, func, cfg, tq, reload) => {
  if (reload) {
    try { delete publicRequire.cache[publicRequire.resolve(mod)]; } catch (e) {}
  }
  const m = publicRequire(mod);
  if (typeof m[func] !== 'function') throw new Error(mod + ' exports no function ' + func);
  const rc = m[func](cfg, tq);
  return rc === undefined ? 0 : rc;
});
)JS";

void set_failed(const std::string &why) {
  {
    std::lock_guard<std::mutex> g(mu);
    failed = true;
    start_error = why;
    exited = true;
  }
  cv.notify_all();
}

// The Node.js process: initialisation, one environment until it is stopped, then V8 and the
// platform torn down, all on this thread. Every local (the platform and its worker threads
// included) is gone when it returns.
void run_node() {
  std::vector<std::string> args = {"polygate-node"};
  if (const char *o = getenv("POLYGATE_NODE_OPTIONS")) {
    std::string s(o), cur;
    for (char c : s) {
      if (c == ' ') {
        if (!cur.empty()) args.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) args.push_back(cur);
  }
  using F = node::ProcessInitializationFlags::Flags;
  std::unique_ptr<node::InitializationResult> result = node::InitializeOncePerProcess(
      args, {F::kNoInitializeV8, F::kNoInitializeNodeV8Platform, F::kNoStdioInitialization,
             F::kNoDefaultSignalHandling});
  for (const std::string &e : result->errors()) log_line(0, "node: " + e);
  if (result->early_return() != 0) {
    set_failed("Node.js initialisation failed (exit code " + std::to_string(result->exit_code()) + ")");
    return;
  }
  std::unique_ptr<node::MultiIsolatePlatform> platform = node::MultiIsolatePlatform::Create(4);
  v8::V8::InitializePlatform(platform.get());
  v8::V8::Initialize();
  {
    std::vector<std::string> errors;
    std::unique_ptr<node::CommonEnvironmentSetup> setup = node::CommonEnvironmentSetup::Create(
        platform.get(), &errors, result->args(), result->exec_args());
    if (!setup) {
      std::string all;
      for (const std::string &e : errors) all += e + "; ";
      set_failed("cannot create the Node.js environment: " + all);
      return;
    }
    v8::Isolate *isolate = setup->isolate();
    node::Environment *env = setup->env();
    {
      v8::Locker locker(isolate);
      v8::Isolate::Scope isolate_scope(isolate);
      v8::HandleScope handle_scope(isolate);
      v8::Context::Scope context_scope(setup->context());
      node::AddLinkedBinding(env, "polygate_ffi", binding_init);
      g_env.store(env);
      v8::MaybeLocal<v8::Value> ret = node::LoadEnvironment(env, BOOTSTRAP);
      if (ret.IsEmpty()) {
        g_env.store(nullptr);
        set_failed("the Node.js bootstrap threw");
        return;
      }
      log_line(2, std::string("Node.js ") + NODE_VERSION_STRING + " environment started");
      node::SpinEventLoop(env).FromMaybe(1);
      {
        std::lock_guard<std::mutex> g(tsfn_mu);
        env_alive = false;
      }
      g_env.store(nullptr);
      node::Stop(env);
    }
  }
  v8::V8::Dispose();
  v8::V8::DisposePlatform();
  platform.reset();
}

void node_main() {
  run_node();
  // only now: the exit path (stop_at_exit) goes on to the process's static destructors, which
  // must not run while this thread still tears V8 down or joins the platform's workers (that
  // race aborted the process at exit, about once in three under load)
  {
    std::lock_guard<std::mutex> g(mu);
    exited = true;
  }
  cv.notify_all();
}

// At exit: stop the environment and give its thread a moment to finish.
void stop_at_exit() {
  node::Environment *env = g_env.load();
  if (env != nullptr) node::Stop(env);
  std::unique_lock<std::mutex> g(mu);
  cv.wait_for(g, std::chrono::seconds(2), [] { return exited; });
}

// Starts the environment once; waits until its init function is registered.
bool ensure_started(std::string *why) {
  std::unique_lock<std::mutex> g(mu);
  if (!started) {
    started = true;
    std::thread(node_main).detach();
    atexit(stop_at_exit);
  }
  cv.wait_for(g, std::chrono::seconds(60), [] { return ready || failed; });
  if (ready) return true;
  *why = failed ? start_error : "the Node.js environment did not start within 60 s";
  return false;
}

int init(const std::string &cfg, void *tq) {
  // module[?],func[,cfg]
  size_t c1 = cfg.find(',');
  if (c1 == std::string::npos || c1 == 0) {
    log_line(0, "cfg \"" + cfg + "\": expected \"module[?],func[,cfg]\"");
    return 1;
  }
  size_t c2 = cfg.find(',', c1 + 1);
  auto r = std::make_shared<InitReq>();
  r->module = cfg.substr(0, c1);
  r->func = cfg.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1);
  r->cfg = c2 == std::string::npos ? "" : cfg.substr(c2 + 1);
  if (!r->module.empty() && r->module.back() == '?') {
    r->module.pop_back();
    r->reload = true;
  }
  if (r->module.empty() || r->func.empty()) {
    log_line(0, "cfg \"" + cfg + "\": expected \"module[?],func[,cfg]\"");
    return 1;
  }
  r->tq = reinterpret_cast<uint64_t>(tq);
  std::string why;
  if (!ensure_started(&why)) {
    log_line(0, why);
    return 1;
  }
  auto holder = new std::shared_ptr<InitReq>(r);
  if (napi_call_threadsafe_function(init_tsfn, holder, napi_tsfn_blocking) != napi_ok) {
    delete holder;
    log_line(0, "the Node.js environment is not running");
    return 1;
  }
  std::unique_lock<std::mutex> g(mu);
  if (!cv.wait_for(g, std::chrono::seconds(60), [&] { return r->done; })) {
    log_line(0, cfg + ": the init function did not return within 60 s");
    return 1;
  }
  if (!r->error.empty()) log_line(0, cfg + ": " + r->error);
  return r->rc;
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int libffi_init(char *cfg, void *tq) {
  try {
    return init(cfg ? std::string(cfg) : std::string(), tq);
  } catch (const std::exception &e) {
    log_line(0, std::string("libffi_init: ") + e.what());
    return 1;
  } catch (...) {
    log_line(0, "libffi_init: unknown exception");
    return 1;
  }
}
