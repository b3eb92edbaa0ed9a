//! An echo runtime: `ngx.load_ffi("ffi_rust_echo")` or the `ffi` plugin with
//! `lib: ffi_rust_echo`. Answers each request with its own bytes. With the cfg `"json"` it
//! answers the `ffi` plugin's request description with a `continue` action that adds an
//! `x-rust-echo` header carrying the request path; with `"continue"` it answers nothing (the
//! `ffi` plugin continues unchanged: the cheapest plugin round trip, for benchmarks). A
//! `,pollers=N` suffix (`"json,pollers=3"`) polls with N threads instead of one; `,inline`
//! (`"continue,inline"`) runs the handler on the gateway's thread that makes the call
//! ([`Options::inline`]). In `json` mode an `x-rust-thread` header names the thread that ran
//! the handler.
#![allow(unsafe_code, reason = "the runtime! macro exports libffi_init")]

use polygate_ffi_sdk::{Error, Handler, Options, runtime};

struct Echo {
    json: bool,
    empty: bool,
}

impl Handler for Echo {
    fn call(&self, req: &[u8]) -> Result<Vec<u8>, Error> {
        if self.empty {
            return Ok(Vec::new());
        }
        if !self.json {
            return Ok(req.to_vec());
        }
        let text = std::str::from_utf8(req).map_err(|_| Error::new("request is not UTF-8"))?;
        // tiny extraction of "path" without a JSON dependency
        let path = text
            .split("\"path\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .ok_or_else(|| Error::with_rc(2, "no path in request"))?;
        // the thread that ran the handler: a poller (`ffi-poll-N`), or with `inline` the
        // gateway's own worker thread
        // (the kernel's name: this library's std does not know threads the host started)
        let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
        let thread = comm.trim_end();
        Ok(format!(
            "{{\"action\":\"continue\",\"set_headers\":{{\"x-rust-echo\":\"{path}\",\"x-rust-thread\":\"{thread}\"}}}}"
        )
        .into_bytes())
    }
}

fn init(cfg: Option<&str>) -> Result<(Echo, Options), Error> {
    let mut parts = cfg.unwrap_or("").split(',');
    let mode = parts.next().unwrap_or("");
    // one poller by default (the SDK's): the handler never blocks, and a second poller waiting
    // while the first works would cost a wake-up per batch (see `Options::pollers`)
    let mut opts = Options::default();
    for p in parts {
        if p == "inline" {
            opts.inline = true;
            continue;
        }
        opts.pollers = p
            .strip_prefix("pollers=")
            .and_then(|n| n.parse().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                Error::new(format!(
                    "unknown cfg part {p:?} (pollers=N with N > 0, or inline)"
                ))
            })?;
    }
    Ok((
        Echo {
            json: mode == "json",
            empty: mode == "continue",
        },
        opts,
    ))
}

runtime!(init);
