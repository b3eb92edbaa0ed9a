//! Sequential echo round trips: polygate's FFI host calling a Go runtime, vs the same Go echo
//! logic behind a unix domain socket (4-byte big-endian length prefix), both driven from one
//! current-thread tokio runtime (the gateway's worker model), one call in flight at a time.
//!
//!     polygate-ffi-bench <libffi_go_echo.so> <uds path> [calls] [sizes...]
#![forbid(unsafe_code)]

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() {
    std::hint::black_box(polygate_ffi::abi::exported_symbols());
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!(
            "usage: {} <libffi_go_echo.so> <uds path> [calls] [sizes...]",
            args[0]
        );
        std::process::exit(2);
    }
    let lib = &args[1];
    let sock = &args[2];
    let calls: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let sizes: Vec<usize> = if args.len() > 4 {
        args[4..].iter().filter_map(|s| s.parse().ok()).collect()
    } else {
        vec![512, 4096, 10240, 102_400]
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ffi = polygate_ffi::host()
            .load(lib, None, &polygate_ffi::LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut uds = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect to the uds echo server");
        println!(
            "{:>8} {:>10} {:>10} {:>8}",
            "payload", "ffi (s)", "uds (s)", "uds/ffi"
        );
        for size in sizes {
            let payload = vec![b'x'; size];
            // warm up both paths
            for _ in 0..1000 {
                ffi.call(Some(&payload), None).await.expect("ffi call");
                uds_call(&mut uds, &payload).await;
            }
            let t = Instant::now();
            for _ in 0..calls {
                let (rc, body) = ffi.call(Some(&payload), None).await.expect("ffi call");
                assert!(rc == 0 && body.as_ref().map(|b| b.len()) == Some(size));
            }
            let ffi_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..calls {
                let n = uds_call(&mut uds, &payload).await;
                assert_eq!(n, size);
            }
            let uds_s = t.elapsed().as_secs_f64();
            println!(
                "{size:>8} {ffi_s:>10.3} {uds_s:>10.3} {:>7.2}x",
                uds_s / ffi_s
            );
        }
    });
}

async fn uds_call(s: &mut tokio::net::UnixStream, payload: &[u8]) -> usize {
    let mut msg = Vec::with_capacity(4 + payload.len());
    msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).await.expect("uds write");
    let mut hdr = [0u8; 4];
    s.read_exact(&mut hdr).await.expect("uds read");
    let n = u32::from_be_bytes(hdr) as usize;
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.expect("uds read");
    n
}
