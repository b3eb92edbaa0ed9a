//! The access log: one JSON line per request, written by a background thread so the request
//! path never blocks on I/O.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use polygate_core::RequestCtx;

/// The fields of one access log line.
pub struct AccessRecord<'a> {
    /// The finished request.
    pub ctx: &'a RequestCtx,
    /// Response body bytes sent.
    pub body_bytes: u64,
    /// Whether the body was sent completely.
    pub complete: bool,
    /// Upstream id.
    pub upstream_id: Option<&'a str>,
}

/// A handle to the access log writer.
pub struct AccessLog {
    tx: mpsc::Sender<String>,
}

impl AccessLog {
    /// Starts the writer thread. `path` = None writes to standard output.
    pub fn start(path: Option<&str>) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match path {
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("polygate-access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(line.as_bytes());
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(more.as_bytes());
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                        return;
                    }
                    buf.clear();
                }
            })?;
        Ok(AccessLog { tx })
    }

    /// Queues one line.
    pub fn write(&self, r: &AccessRecord<'_>) {
        let _ = self.tx.send(format_line(r));
    }
}

fn esc(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Formats one line (JSON object + newline).
pub fn format_line(r: &AccessRecord<'_>) -> String {
    let c = r.ctx;
    let mut s = String::with_capacity(320);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let _ = write!(
        s,
        "{{\"time\":\"{}\",\"client\":\"{}\",\"method\":\"{}\",\"uri\":{},\"status\":{},\"bytes\":{},\"latency_ms\":{:.3}",
        rfc3339(now.as_secs(), now.subsec_millis()),
        c.client_addr.ip(),
        c.method,
        esc(&c.request_uri),
        c.status.map_or(0, |s| s.as_u16()),
        r.body_bytes,
        c.started.elapsed().as_secs_f64() * 1000.0,
    );
    if let Some(l) = c.upstream_latency {
        let _ = write!(
            s,
            ",\"upstream_latency_ms\":{:.3}",
            l.as_secs_f64() * 1000.0
        );
    }
    if let Some(id) = &c.route_id {
        let _ = write!(s, ",\"route_id\":{}", esc(id));
    }
    if let Some(id) = r.upstream_id {
        let _ = write!(s, ",\"upstream_id\":{}", esc(id));
    }
    if let Some(a) = c.upstream_addr {
        let _ = write!(s, ",\"upstream\":\"{a}\"");
    }
    if let Some(cn) = &c.consumer {
        let _ = write!(s, ",\"consumer\":{}", esc(&cn.username));
    }
    if !r.complete {
        s.push_str(",\"incomplete\":true");
    }
    s.push_str("}\n");
    s
}

/// Formats a UTC timestamp as RFC 3339 with milliseconds.
pub fn rfc3339(secs: u64, millis: u32) -> String {
    let rem = secs % 86_400;
    let (y, m, d) = polygate_core::time::civil((secs / 86_400) as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_795_000_000, 5), "2026-11-18T11:06:40.005Z");
    }
}
