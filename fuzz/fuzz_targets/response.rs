//! The upstream response head parser and the chunked decoder on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    polygate_proxy::h1::fuzz_response(data);
});
