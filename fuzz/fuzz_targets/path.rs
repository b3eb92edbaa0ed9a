//! The request path normaliser: any input either fails cleanly or gives a normal form that
//! starts with `/`, has no dot segments, and is its own normal form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use polygate_core::path::{escape_path, normalize};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    for merge in [true, false] {
        if let Ok(n) = normalize(raw, merge) {
            assert!(n.starts_with('/'), "{n:?}");
            assert!(!n.split('/').any(|s| s == "." || s == ".."), "{n:?}");
            // escaping and normalising again lands on the same path
            let escaped = escape_path(&n).into_owned();
            let again = normalize(&escaped, merge).expect("escaped normal form");
            assert_eq!(again.as_ref(), n.as_ref());
        }
    }
});
