//! Small byte-writing helpers for hot paths, where `write!` and its formatting machinery cost
//! more than the rest of the work (measured with callgrind: about 600 instructions per number).

/// Appends the decimal digits of `n`.
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    if n < 1000 {
        // the usual case (an IPv4 octet, a status, a short length): digit by digit, without
        // the scratch buffer's copy (a memcpy call)
        if n >= 100 {
            out.push(b'0' + (n / 100) as u8);
        }
        if n >= 10 {
            out.push(b'0' + (n / 10 % 10) as u8);
        }
        out.push(b'0' + (n % 10) as u8);
        return;
    }
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

/// A number as Lua's `tostring` writes it: integers below 1e15 in full, anything else as
/// `%.14g` (14 significant digits; exponent notation below 1e-4 and from 1e14), `nan`, `inf`.
pub fn lua_number(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
        return format!("{}", x as i64);
    }
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // the exponent after rounding to 14 significant digits decides the notation, as in C
    let sci = format!("{x:.13e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..14).contains(&exp) {
        let mant = mant.trim_end_matches('0').trim_end_matches('.');
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (13 - exp).max(0) as usize;
    let fixed = format!("{x:.decimals$}");
    if fixed.contains('.') {
        fixed.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        fixed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lua_numbers() {
        // what LuaJIT's tostring prints (%.14g)
        for (x, want) in [
            (3.0, "3"),
            (0.5, "0.5"),
            (-12.25, "-12.25"),
            (0.1, "0.1"),
            (1e20, "1e+20"),
            (1_700_000_000.0, "1700000000"),
            (0.123_456_789_012_345_68, "0.12345678901235"),
            (0.00001234, "1.234e-05"),
            (0.0001, "0.0001"),
            (f64::INFINITY, "inf"),
        ] {
            assert_eq!(lua_number(x), want, "{x}");
        }
    }

    #[test]
    fn decimals() {
        for n in [
            0u64,
            7,
            10,
            99,
            100,
            105,
            999,
            1000,
            65535,
            1_000_000_007,
            u64::MAX,
        ] {
            let mut v = b"x".to_vec();
            push_decimal(&mut v, n);
            assert_eq!(v, format!("x{n}").into_bytes());
        }
    }
}
