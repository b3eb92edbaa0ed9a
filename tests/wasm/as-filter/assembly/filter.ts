// An SDK-free proxy-wasm filter (ABI 0.2.1) in AssemblyScript, for polygate's end-to-end
// tests. Its plugin configuration is `key=value;...`:
//
//   mode=auth;upstream=U  request headers: callout GET /check to U with the client's
//                         x-token, paused until it answers: 200 -> `x-auth-user: <body>`
//                         on the request and go on; another status -> local 401; a failed
//                         callout -> local 503. Response headers: callout GET /stamp to U,
//                         paused until it answers -> `x-stamp: <body>` on the response.
//   mode=two;upstream=U   request headers: GET /a and GET /b to U at once, go on when both
//                         answered, with `x-call-a` / `x-call-b` holding their bodies.
//   mode=body             request body: held back until complete, then upper-cased;
//                         response body: held back until complete, then a trailer line added.
//   mode=stream           request body: every chunk upper-cased and bracketed as it passes
//                         (`[CHUNK]`), to show chunk-by-chunk streaming.
//   mode=bodycall;upstream=U  response body: held back until complete, then paused for a
//                         callout GET /stamp to U whose answer is appended to the body.
//   tick=1                a 50 ms tick sets shared data `as_filter.tick` to "yes".
//   queue=1               every request's path goes into the shared queue `as_filter.q`; the
//                         queue's owner (the last root context that registered it) moves
//                         each item to shared data `as_filter.last` in proxy_on_queue_ready;
//                         responses carry it as `x-last-queued`.
//
//   mode=deferred;upstream=U  proxy_on_done answers false and makes a callout GET /stamp to
//                         U; its answer calls proxy_done(), which lets log and delete run.
//   mode=trailers         trailer fields: `x-wasm-req-trailer: seen-<x-req-trailer>` added to
//                         the request's (with `request_body: stream`), `x-wasm-trailer:
//                         seen-<x-checksum>` to the response's.
//   mode=pairs            request: `x-pairs-count` holds the number of request header pairs
//                         (`proxy_get_header_map_pairs`); response: the whole header map is
//                         read and set back with `x-pairs-set: yes` added
//                         (`proxy_set_header_map_pairs`).
//
// Any request with `x-close` is closed by the filter (`proxy_close_stream`). Every request
// gets `x-props` upstream: request.method|request.url_path|route_name|cluster_name|
// source.port (an 8-byte integer)|remote_addr (an nginx variable). The VM configuration
// (`proxy_on_vm_start`) is kept in shared data and sent back as `x-vm-config`.
//
// Every request also counts itself in shared data `as_filter.hits` (compare-and-swap loop)
// and in the counter metric `as_filter_requests_total`, and the response gets `x-hits` and,
// once the tick ran, `x-ticked`.

@external("env", "proxy_log")
declare function proxy_log(level: i32, p: usize, n: usize): i32;
@external("env", "proxy_get_buffer_bytes")
declare function proxy_get_buffer_bytes(t: i32, start: i32, max: i32, rp: usize, rn: usize): i32;
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(t: i32, start: i32, size: i32, p: usize, n: usize): i32;
@external("env", "proxy_get_header_map_value")
declare function proxy_get_header_map_value(m: i32, kp: usize, kn: usize, rp: usize, rn: usize): i32;
@external("env", "proxy_add_header_map_value")
declare function proxy_add_header_map_value(m: i32, kp: usize, kn: usize, vp: usize, vn: usize): i32;
@external("env", "proxy_http_call")
declare function proxy_http_call(
  up: usize, upn: usize, hp: usize, hn: usize, bp: usize, bn: usize,
  tp: usize, tn: usize, timeout: i32, ret: usize,
): i32;
@external("env", "proxy_set_effective_context")
declare function proxy_set_effective_context(id: i32): i32;
@external("env", "proxy_continue_stream")
declare function proxy_continue_stream(t: i32): i32;
@external("env", "proxy_send_local_response")
declare function proxy_send_local_response(
  status: i32, dp: usize, dn: usize, bp: usize, bn: usize, hp: usize, hn: usize, grpc: i32,
): i32;
@external("env", "proxy_get_shared_data")
declare function proxy_get_shared_data(kp: usize, kn: usize, rp: usize, rn: usize, rcas: usize): i32;
@external("env", "proxy_set_shared_data")
declare function proxy_set_shared_data(kp: usize, kn: usize, vp: usize, vn: usize, cas: u32): i32;
@external("env", "proxy_define_metric")
declare function proxy_define_metric(t: i32, np: usize, nn: usize, ret: usize): i32;
@external("env", "proxy_increment_metric")
declare function proxy_increment_metric(id: i32, delta: i64): i32;
@external("env", "proxy_register_shared_queue")
declare function proxy_register_shared_queue(np: usize, nn: usize, ret: usize): i32;
@external("env", "proxy_enqueue_shared_queue")
declare function proxy_enqueue_shared_queue(id: u32, vp: usize, vn: usize): i32;
@external("env", "proxy_dequeue_shared_queue")
declare function proxy_dequeue_shared_queue(id: u32, rp: usize, rn: usize): i32;
@external("env", "proxy_get_property")
declare function proxy_get_property(pp: usize, pn: usize, rp: usize, rn: usize): i32;
@external("env", "proxy_get_header_map_pairs")
declare function proxy_get_header_map_pairs(m: i32, rp: usize, rn: usize): i32;
@external("env", "proxy_set_header_map_pairs")
declare function proxy_set_header_map_pairs(m: i32, p: usize, n: usize): i32;
@external("env", "proxy_close_stream")
declare function proxy_close_stream(t: i32): i32;
@external("env", "proxy_done")
declare function proxy_done(): i32;
@external("env", "proxy_get_status")
declare function proxy_get_status(rcode: usize, rp: usize, rn: usize): i32;
@external("env", "proxy_set_tick_period_milliseconds")
declare function proxy_set_tick_period_milliseconds(ms: i32): i32;

const REQUEST_HEADERS = 0;
const RESPONSE_HEADERS = 2;
const CALL_RESPONSE_HEADERS = 6;
const REQUEST_BODY = 0;
const RESPONSE_BODY = 1;
const CALL_RESPONSE_BODY = 4;
const PLUGIN_CONFIGURATION = 7;
const VM_CONFIGURATION = 6;

export function proxy_abi_version_0_2_1(): void {}

export function proxy_on_memory_allocate(size: usize): usize {
  return heap.alloc(size);
}

// out-parameters of hostcalls
const RET = memory.data(16);

function retPtr(): usize { return load<u32>(RET); }
function retLen(): usize { return load<u32>(RET + 4); }

function bytes(s: string): ArrayBuffer { return String.UTF8.encode(s); }

function log(msg: string): void {
  const b = bytes(msg);
  proxy_log(2, changetype<usize>(b), b.byteLength);
}

function getHeader(map: i32, key: string): string | null {
  const k = bytes(key);
  if (proxy_get_header_map_value(map, changetype<usize>(k), k.byteLength, RET, RET + 4) != 0) {
    return null;
  }
  return String.UTF8.decodeUnsafe(retPtr(), retLen());
}

function addHeader(map: i32, key: string, value: string): void {
  const k = bytes(key);
  const v = bytes(value);
  proxy_add_header_map_value(map, changetype<usize>(k), k.byteLength, changetype<usize>(v), v.byteLength);
}

function buffer(t: i32, size: i32): ArrayBuffer {
  if (size == 0 || proxy_get_buffer_bytes(t, 0, size, RET, RET + 4) != 0 || retLen() == 0) {
    return new ArrayBuffer(0);
  }
  const out = new ArrayBuffer(<i32>retLen());
  memory.copy(changetype<usize>(out), retPtr(), retLen());
  return out;
}

/// A serialised header map: count, then (key length, value length) pairs, then NUL-ended data.
function pairs(kv: string[]): ArrayBuffer {
  const n = kv.length / 2;
  const enc = new Array<ArrayBuffer>(kv.length);
  let size = 4 + n * 8;
  for (let i = 0; i < kv.length; i++) {
    enc[i] = bytes(kv[i]);
    size += enc[i].byteLength + 1;
  }
  const out = new ArrayBuffer(size);
  const base = changetype<usize>(out);
  store<u32>(base, n);
  let data = base + 4 + n * 8;
  for (let i = 0; i < kv.length; i++) {
    store<u32>(base + 4 + i * 4, enc[i].byteLength);
    memory.copy(data, changetype<usize>(enc[i]), enc[i].byteLength);
    data += enc[i].byteLength;
    store<u8>(data, 0);
    data += 1;
  }
  return out;
}

function call(upstream: string, path: string, token: string): u32 {
  const up = bytes(upstream);
  const h = pairs([":method", "GET", ":path", path, ":authority", "callout", "x-token", token]);
  const rc = proxy_http_call(
    changetype<usize>(up), up.byteLength, changetype<usize>(h), h.byteLength,
    0, 0, 0, 0, 2000, RET,
  );
  if (rc != 0) {
    log("proxy_http_call failed: " + rc.toString());
    return 0;
  }
  return load<u32>(RET);
}

function localReply(status: i32, body: string): void {
  const b = bytes(body);
  const h = pairs(["content-type", "text/plain"]);
  proxy_send_local_response(status, 0, 0, changetype<usize>(b), b.byteLength, changetype<usize>(h), h.byteLength, -1);
}

function sharedGet(key: string): string | null {
  const k = bytes(key);
  if (proxy_get_shared_data(changetype<usize>(k), k.byteLength, RET, RET + 4, RET + 8) != 0) {
    return null;
  }
  return String.UTF8.decodeUnsafe(retPtr(), retLen());
}

function sharedSet(key: string, value: string, cas: u32): i32 {
  const k = bytes(key);
  const v = bytes(value);
  return proxy_set_shared_data(changetype<usize>(k), k.byteLength, changetype<usize>(v), v.byteLength, cas);
}

/// Increments a decimal counter in shared data with compare-and-swap; returns the new value.
function bumpHits(): i32 {
  for (let attempt = 0; attempt < 100; attempt++) {
    const k = bytes("as_filter.hits");
    let cur = 0;
    let cas: u32 = 0;
    if (proxy_get_shared_data(changetype<usize>(k), k.byteLength, RET, RET + 4, RET + 8) == 0) {
      cur = I32.parseInt(String.UTF8.decodeUnsafe(retPtr(), retLen()));
      cas = load<u32>(RET + 8);
    }
    if (sharedSet("as_filter.hits", (cur + 1).toString(), cas) == 0) {
      return cur + 1;
    }
  }
  return -1;
}

/// A property (path segments joined by NUL) as bytes, or null.
function prop(path: string): ArrayBuffer | null {
  const p = bytes(path.replaceAll("/", "\0"));
  if (proxy_get_property(changetype<usize>(p), p.byteLength, RET, RET + 4) != 0) return null;
  const out = new ArrayBuffer(<i32>retLen());
  memory.copy(changetype<usize>(out), retPtr(), retLen());
  return out;
}

function propText(path: string): string {
  const b = prop(path);
  return b == null ? "-" : String.UTF8.decode(b!);
}

/// The pairs of a serialised header map.
function decodePairs(p: usize, n: usize): string[] {
  const out = new Array<string>();
  if (n < 4) return out;
  const count = load<u32>(p);
  let data = p + 4 + count * 8;
  for (let i: u32 = 0; i < count; i++) {
    const kl = load<u32>(p + 4 + i * 8);
    const vl = load<u32>(p + 8 + i * 8);
    out.push(String.UTF8.decodeUnsafe(data, kl));
    data += kl + 1;
    out.push(String.UTF8.decodeUnsafe(data, vl));
    data += vl + 1;
  }
  return out;
}

export function proxy_on_vm_start(root: i32, size: i32): i32 {
  sharedSet("as_filter.vm_config", String.UTF8.decode(buffer(VM_CONFIGURATION, size)), 0);
  return 1;
}

// ---- configuration (one root context per plugin configuration)
class Conf {
  mode: string = "";
  upstream: string = "";
  tick: bool = false;
  queue: bool = false;
}
let queueId: u32 = 0;
const confs = new Map<i32, Conf>();
let metric: i32 = 0;

function parse(text: string): Conf {
  const c = new Conf();
  const parts = text.split(";");
  for (let i = 0; i < parts.length; i++) {
    const kv = parts[i].split("=");
    if (kv.length != 2) continue;
    if (kv[0] == "mode") c.mode = kv[1];
    else if (kv[0] == "upstream") c.upstream = kv[1];
    else if (kv[0] == "tick") c.tick = kv[1] == "1";
    else if (kv[0] == "queue") c.queue = kv[1] == "1";
  }
  return c;
}

export function proxy_on_configure(root: i32, size: i32): i32 {
  const conf = parse(String.UTF8.decode(buffer(PLUGIN_CONFIGURATION, size)));
  confs.set(root, conf);
  if (metric == 0) {
    const n = bytes("as_filter_requests_total");
    if (proxy_define_metric(0, changetype<usize>(n), n.byteLength, RET) == 0) {
      metric = load<i32>(RET);
    }
  }
  if (conf.tick) proxy_set_tick_period_milliseconds(50);
  if (conf.queue) {
    const q = bytes("as_filter.q");
    if (proxy_register_shared_queue(changetype<usize>(q), q.byteLength, RET) == 0) {
      queueId = load<u32>(RET);
    }
  }
  return 1;
}

export function proxy_on_queue_ready(root: i32, id: u32): void {
  while (proxy_dequeue_shared_queue(id, RET, RET + 4) == 0) {
    sharedSet("as_filter.last", String.UTF8.decodeUnsafe(retPtr(), retLen()), 0);
  }
}

export function proxy_on_tick(root: i32): void {
  sharedSet("as_filter.tick", "yes", 0);
}

// ---- streams
class Stream {
  root: i32 = 0;
  pending: i32 = 0;
  callA: string = "";
  callB: string = "";
}
const streams = new Map<i32, Stream>();
// callout token -> (stream id, which call)
const tokens = new Map<u32, i32>();
const tokenKind = new Map<u32, string>();

export function proxy_on_context_create(id: i32, parent: i32): void {
  if (parent == 0) return;
  const s = new Stream();
  s.root = parent;
  streams.set(id, s);
}

function confOf(id: i32): Conf {
  return confs.get(streams.get(id).root);
}

export function proxy_on_request_headers(id: i32, n: i32, eos: i32): i32 {
  proxy_increment_metric(metric, 1);
  const hits = bumpHits();
  addHeader(REQUEST_HEADERS, "x-hits", hits.toString());
  const conf = confOf(id);
  const s = streams.get(id);
  const port = prop("source/port");
  const portText = port == null ? "-" : load<i64>(changetype<usize>(port!)).toString();
  addHeader(
    REQUEST_HEADERS,
    "x-props",
    propText("request/method") + "|" + propText("request/url_path") + "|" +
      propText("route_name") + "|" + propText("cluster_name") + "|" + portText + "|" +
      propText("remote_addr"),
  );
  if (getHeader(REQUEST_HEADERS, "x-close") != null) {
    proxy_close_stream(0);
    return 0;
  }
  if (conf.mode == "pairs" && proxy_get_header_map_pairs(REQUEST_HEADERS, RET, RET + 4) == 0) {
    addHeader(REQUEST_HEADERS, "x-pairs-count", (decodePairs(retPtr(), retLen()).length / 2).toString());
  }
  if (conf.queue && queueId != 0) {
    const path = getHeader(REQUEST_HEADERS, ":path");
    if (path != null) {
      const v = bytes(path!);
      proxy_enqueue_shared_queue(queueId, changetype<usize>(v), v.byteLength);
    }
  }
  if (conf.mode == "auth") {
    const tokenHeader = getHeader(REQUEST_HEADERS, "x-token");
    const t = call(conf.upstream, "/check", tokenHeader == null ? "" : tokenHeader!);
    if (t == 0) {
      localReply(500, "callout refused\n");
      return 1;
    }
    tokens.set(t, id);
    tokenKind.set(t, "check");
    s.pending = 1;
    return 1;
  }
  if (conf.mode == "two") {
    const a = call(conf.upstream, "/a", "");
    const b = call(conf.upstream, "/b", "");
    tokens.set(a, id);
    tokenKind.set(a, "a");
    tokens.set(b, id);
    tokenKind.set(b, "b");
    s.pending = 2;
    return 1;
  }
  return 0;
}

export function proxy_on_request_body(id: i32, size: i32, eos: i32): i32 {
  if (confOf(id).mode == "stream") {
    if (size == 0) return 0;
    const chunk = String.UTF8.decode(buffer(REQUEST_BODY, size));
    const out = bytes("[" + chunk.toUpperCase() + "]");
    proxy_set_buffer_bytes(REQUEST_BODY, 0, size, changetype<usize>(out), out.byteLength);
    return 0;
  }
  if (confOf(id).mode != "body") return 0;
  if (eos == 0) return 1;
  const body = buffer(REQUEST_BODY, size);
  const up = String.UTF8.decode(body).toUpperCase();
  const out = bytes(up);
  proxy_set_buffer_bytes(REQUEST_BODY, 0, size, changetype<usize>(out), out.byteLength);
  return 0;
}

export function proxy_on_response_headers(id: i32, n: i32, eos: i32): i32 {
  const hits = sharedGet("as_filter.hits");
  if (hits != null) addHeader(RESPONSE_HEADERS, "x-hits", hits!);
  const ticked = sharedGet("as_filter.tick");
  if (ticked != null) addHeader(RESPONSE_HEADERS, "x-ticked", ticked!);
  const last = sharedGet("as_filter.last");
  if (last != null) addHeader(RESPONSE_HEADERS, "x-last-queued", last!);
  const vmConfig = sharedGet("as_filter.vm_config");
  if (vmConfig != null) addHeader(RESPONSE_HEADERS, "x-vm-config", vmConfig!);
  const conf = confOf(id);
  if (conf.mode == "trailers") {
    // a trailer field reaches an HTTP/1.1 client only when the Trailer header names it
    addHeader(RESPONSE_HEADERS, "trailer", "x-wasm-trailer");
  }
  if (conf.mode == "pairs" && proxy_get_header_map_pairs(RESPONSE_HEADERS, RET, RET + 4) == 0) {
    const kv = decodePairs(retPtr(), retLen());
    kv.push("x-pairs-set");
    kv.push("yes");
    const m = pairs(kv);
    proxy_set_header_map_pairs(RESPONSE_HEADERS, changetype<usize>(m), m.byteLength);
  }
  if (conf.mode == "auth") {
    const t = call(conf.upstream, "/stamp", "");
    if (t == 0) return 0;
    tokens.set(t, id);
    tokenKind.set(t, "stamp");
    return 1;
  }
  return 0;
}

export function proxy_on_response_body(id: i32, size: i32, eos: i32): i32 {
  const conf = confOf(id);
  if (conf.mode == "bodycall") {
    if (eos == 0) return 1;
    const t = call(conf.upstream, "/stamp", "");
    if (t == 0) return 0;
    tokens.set(t, id);
    tokenKind.set(t, "bodystamp");
    return 1;
  }
  if (conf.mode != "body") return 0;
  if (eos == 0) return 1;
  const tail = bytes("\n-- rewritten by as_filter");
  proxy_set_buffer_bytes(RESPONSE_BODY, size, 0, changetype<usize>(tail), tail.byteLength);
  return 0;
}

export function proxy_on_request_trailers(id: i32, n: i32): i32 {
  if (confOf(id).mode != "trailers") return 0;
  const t = getHeader(1, "x-req-trailer");
  addHeader(1, "x-wasm-req-trailer", t == null ? "none" : "seen-" + t!);
  return 0;
}

export function proxy_on_response_trailers(id: i32, n: i32): i32 {
  if (confOf(id).mode != "trailers") return 0;
  const sum = getHeader(3, "x-checksum");
  addHeader(3, "x-wasm-trailer", sum == null ? "none" : "seen-" + sum!);
  return 0;
}

export function proxy_on_http_call_response(root: i32, token: u32, nh: i32, bs: i32, nt: i32): void {
  if (!tokens.has(token)) return;
  const id = tokens.get(token);
  const kind = tokenKind.get(token);
  tokens.delete(token);
  if (!streams.has(id)) return;
  proxy_set_effective_context(id);
  const s = streams.get(id);
  if (kind == "done") {
    log("as_filter deferred done for " + id.toString());
    proxy_done();
    return;
  }
  if (nh == 0) {
    // a failed callout arrives with no headers
    if (kind == "stamp" || kind == "bodystamp") {
      proxy_continue_stream(1);
    } else {
      localReply(503, "callout failed\n");
    }
    return;
  }
  const body = String.UTF8.decode(buffer(CALL_RESPONSE_BODY, bs));
  const status = getHeader(CALL_RESPONSE_HEADERS, ":status");
  // proxy_get_status gives the same code
  let code: u32 = 0;
  if (proxy_get_status(RET + 12, RET, RET + 4) == 0) code = load<u32>(RET + 12);
  if (kind == "check") {
    if (status != null && status! == "200" && code == 200) {
      addHeader(REQUEST_HEADERS, "x-auth-user", body);
      proxy_continue_stream(0);
    } else {
      localReply(401, "unauthorized\n");
    }
  } else if (kind == "bodystamp") {
    // the held response body is the buffer here: append past its end
    const tail = bytes("\n-- stamped: " + body);
    proxy_set_buffer_bytes(RESPONSE_BODY, 0x7fffffff, 0, changetype<usize>(tail), tail.byteLength);
    proxy_continue_stream(1);
  } else if (kind == "stamp") {
    addHeader(RESPONSE_HEADERS, "x-stamp", body);
    proxy_continue_stream(1);
  } else {
    if (kind == "a") s.callA = body; else s.callB = body;
    s.pending -= 1;
    if (s.pending == 0) {
      addHeader(REQUEST_HEADERS, "x-call-a", s.callA);
      addHeader(REQUEST_HEADERS, "x-call-b", s.callB);
      proxy_continue_stream(0);
    }
  }
}

export function proxy_on_done(id: i32): i32 {
  if (!streams.has(id)) return 1;
  const conf = confOf(id);
  if (conf.mode != "deferred") return 1;
  const t = call(conf.upstream, "/stamp", "");
  if (t == 0) return 1;
  tokens.set(t, id);
  tokenKind.set(t, "done");
  return 0;
}

export function proxy_on_log(id: i32): void {
  if (streams.has(id) && confOf(id).mode == "deferred") {
    log("as_filter log after proxy_done for " + id.toString());
  }
}

export function proxy_on_delete(id: i32): void {
  if (confs.has(id)) {
    // a root context: its plugin configuration is gone
    log("as_filter root context " + id.toString() + " deleted");
    confs.delete(id);
  }
  streams.delete(id);
}
