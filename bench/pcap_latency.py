#!/usr/bin/env python3
"""Server-side latencies of new-connection requests, from a packet capture on loopback.

    pcap_latency.py CAPTURE.pcap SERVER_PORT

CAPTURE holds TCP connections to SERVER_PORT, each a TLS handshake and one request (wrk with
`Connection: close`), written by `tcpdump -w` (pcap, Ethernet or Linux cooked framing). Prints
four figures in ms, "req_p50 req_p99 conn_p50 conn_p99":

- req: from the client's last data segment before the response (the request) to the server's
  first data segment of at least 1,000 bytes after the handshake (the response): the server's
  own time for the request, upstream included, without the client's queue. wrk's latency
  includes the time its one thread takes to get back to a ready socket, which is most of it
  when wrk is CPU-bound doing the client side of every handshake.
- conn: from the client's SYN to that response: what a client opening a connection for one
  request waits, accept queue and handshake included.

Connections whose capture does not show both are left out. Prints "- - - -" when none is left.
"""

import struct
import sys


def packets(path):
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24:
            return
        magic = struct.unpack("<I", head[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            endian = "<"
        else:
            endian = ">"
            magic = struct.unpack(">I", head[:4])[0]
        nano = magic == 0xA1B23C4D
        linktype = struct.unpack(endian + "I", head[20:24])[0]
        skip = {1: 14, 113: 16, 276: 20}.get(linktype)
        if skip is None:
            raise SystemExit(f"unsupported link type {linktype}")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, incl, _ = struct.unpack(endian + "IIII", h)
            data = f.read(incl)
            if len(data) < incl:
                return
            yield sec + frac / (1e9 if nano else 1e6), data[skip:]


def main():
    path, port = sys.argv[1], int(sys.argv[2])
    conns = {}
    for ts, ip in packets(path):
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack(">HH", tcp[:4])
        payload = total - ihl - (tcp[12] >> 4) * 4
        syn = tcp[13] & 0x02 and not tcp[13] & 0x10
        if dport == port:
            key, side = sport, "c"
        elif sport == port:
            key, side = dport, "s"
        else:
            continue
        if syn and side == "c":
            conns[key] = {"syn": ts, "data": []}
        elif key in conns and payload > 0:
            conns[key]["data"].append((ts, side, payload))
    req, conn = [], []
    for c in conns.values():
        data = c["data"]
        # the response: a large server segment after the client's hello and the server's flight
        resp = next(
            (i for i, (_, side, n) in enumerate(data) if side == "s" and n >= 1000 and i > 2),
            None,
        )
        if resp is None:
            continue
        before = [i for i in range(resp) if data[i][1] == "c"]
        if len(before) < 2:
            continue
        req.append(data[resp][0] - data[before[-1]][0])
        conn.append(data[resp][0] - c["syn"])
    if not req:
        print("- - - -")
        return

    def q(v, p):
        v = sorted(v)
        return v[min(len(v) - 1, int(p * len(v)))] * 1000

    print(f"{q(req, .5):.2f} {q(req, .99):.2f} {q(conn, .5):.2f} {q(conn, .99):.2f}")


if __name__ == "__main__":
    main()
