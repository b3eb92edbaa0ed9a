//! Small byte-writing helpers for hot paths, where `write!` and its formatting machinery cost
//! more than the rest of the work (measured with callgrind: about 600 instructions per number).

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 99, 65535, 1_000_000_007, u64::MAX] {
            let mut v = b"x".to_vec();
            push_decimal(&mut v, n);
            assert_eq!(v, format!("x{n}").into_bytes());
        }
    }
}
