#!/usr/bin/env python3
"""Control-plane benchmark driver (bench/admin.sh runs it; Python standard library only).

  load   ETCD N UPSTREAM            write N routes into etcd in APISIX's layout (txn batches)
  wait   PORT PATH TIMEOUT          until GET PATH answers 200 on PORT
  propagate ADMIN KEY PORTS N       N route changes through the Admin API; for each, the time
                                    until every gateway in PORTS serves it; prints p50/p99/max
  burst  ADMIN KEY N SECONDS        N route changes spread over SECONDS
"""
import base64
import http.client
import json
import sys
import time


def b64(s):
    return base64.b64encode(s.encode()).decode()


def etcd_txn(conn, puts):
    body = json.dumps({"success": [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in puts]})
    conn.request("POST", "/v3/kv/txn", body, {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise SystemExit(f"etcd txn: {r.status} {data[:200]!r}")


def load(etcd, n, upstream):
    host, port = etcd.replace("http://", "").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    batch = []
    for i in range(n):
        route = {"id": f"r{i}", "uri": f"/r/{i}", "upstream": {"nodes": {upstream: 1}, "type": "roundrobin"},
                 "create_time": 1, "update_time": 1}
        batch.append((f"/apisix/routes/r{i}", json.dumps(route)))
        if len(batch) == 100:
            etcd_txn(conn, batch)
            batch = []
    if batch:
        etcd_txn(conn, batch)


def status(conn, path):
    conn.request("GET", path)
    r = conn.getresponse()
    r.read()
    return r.status


def wait(port, path, timeout):
    deadline = time.time() + float(timeout)
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", int(port), timeout=5)
            if status(c, path) == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{path} not served on {port} within {timeout} s")


def admin_put(conn, key, rid, body):
    conn.request("PUT", f"/apisix/admin/routes/{rid}", json.dumps(body),
                 {"x-api-key": key, "content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status not in (200, 201):
        raise SystemExit(f"admin PUT: {r.status} {data[:200]!r}")


def upstream_of(conn, key):
    conn.request("GET", "/apisix/admin/routes/r0", headers={"x-api-key": key})
    r = conn.getresponse()
    v = json.loads(r.read())["value"]
    return v["upstream"]


def propagate(admin, key, ports, n):
    a = http.client.HTTPConnection("127.0.0.1", int(admin), timeout=30)
    up = upstream_of(a, key)
    gws = [http.client.HTTPConnection("127.0.0.1", int(p), timeout=30) for p in ports.split(",")]
    stamp = int(time.time() * 1000)
    times = []
    for i in range(int(n)):
        path = f"/moved/{stamp}/{i}"
        t0 = time.perf_counter()
        admin_put(a, key, f"r{(i * 37) % 10000}", {"uri": path, "upstream": up})
        for g in gws:
            while status(g, path) != 200:
                if time.perf_counter() - t0 > 10:
                    raise SystemExit(f"{path} not served within 10 s")
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    print(f"{pick(0.5):.1f} {pick(0.99):.1f} {times[-1]:.1f}")


def burst(admin, key, n, seconds):
    """N updates spread evenly over SECONDS (as fast as the Admin API takes them when it
    cannot keep up): prints how many were made and at what rate."""
    a = http.client.HTTPConnection("127.0.0.1", int(admin), timeout=30)
    up = upstream_of(a, key)
    n, seconds = int(n), float(seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i * seconds / n
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        admin_put(a, key, f"r{(i * 7) % 10000 + 2}", {"uri": f"/burst/{i}", "upstream": up})
    took = time.perf_counter() - t0
    print(f"{n} {n / took:.0f}")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"load": lambda: load(args[0], int(args[1]), args[2]),
     "wait": lambda: wait(*args),
     "propagate": lambda: propagate(*args),
     "burst": lambda: burst(*args)}[cmd]()
