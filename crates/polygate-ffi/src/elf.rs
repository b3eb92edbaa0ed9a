//! Reads a shared library's dynamic symbol table without loading it, so that `polygate
//! validate` can tell whether a runtime exports `libffi_init` without running the library's
//! initialisers (a Go library starts the Go runtime when it is `dlopen`ed).
//!
//! Only what that question needs: 64-bit little-endian ELF, section headers, `.dynsym` and
//! its string table. Every offset is bounds-checked; a malformed file is an error, never a
//! panic.

/// Why a file could not be read as a shared library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Not an ELF file.
    #[error("not an ELF file")]
    NotElf,
    /// An ELF file of another class or byte order than this build reads (64-bit LE).
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    /// An offset or size points outside the file.
    #[error("truncated or malformed ELF file")]
    Malformed,
    /// No dynamic symbol table (a static executable, or not a shared library).
    #[error("no dynamic symbol table")]
    NoDynsym,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ElfError> {
    let s = b.get(at..at.checked_add(2).ok_or(ElfError::Malformed)?);
    let s = s.ok_or(ElfError::Malformed)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ElfError> {
    let s = b.get(at..at.checked_add(4).ok_or(ElfError::Malformed)?);
    let s = s.ok_or(ElfError::Malformed)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, ElfError> {
    let s = b.get(at..at.checked_add(8).ok_or(ElfError::Malformed)?);
    let s = s.ok_or(ElfError::Malformed)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn usize_of(v: u64) -> Result<usize, ElfError> {
    usize::try_from(v).map_err(|_| ElfError::Malformed)
}

const SHT_DYNSYM: u32 = 11;

/// Whether the ELF image `b` defines (exports) the dynamic symbol `name`.
pub fn exports(b: &[u8], name: &str) -> Result<bool, ElfError> {
    if b.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    // EI_CLASS = 2 (64-bit), EI_DATA = 1 (little-endian)
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err(ElfError::Unsupported);
    }
    let shoff = usize_of(u64_at(b, 0x28)?)?;
    let shentsize = usize::from(u16_at(b, 0x3a)?);
    let shnum = usize::from(u16_at(b, 0x3c)?);
    if shentsize < 0x40 {
        return Err(ElfError::Malformed);
    }
    let section = |i: usize| -> Result<(u32, usize, usize, u32, usize), ElfError> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or(ElfError::Malformed)?;
        Ok((
            u32_at(b, at + 4)?,               // sh_type
            usize_of(u64_at(b, at + 0x18)?)?, // sh_offset
            usize_of(u64_at(b, at + 0x20)?)?, // sh_size
            u32_at(b, at + 0x28)?,            // sh_link
            usize_of(u64_at(b, at + 0x38)?)?, // sh_entsize
        ))
    };
    for i in 0..shnum {
        let (ty, off, size, link, entsize) = section(i)?;
        if ty != SHT_DYNSYM {
            continue;
        }
        let (_, str_off, str_size, _, _) =
            section(usize::try_from(link).map_err(|_| ElfError::Malformed)?)?;
        let strtab = b
            .get(str_off..str_off.checked_add(str_size).ok_or(ElfError::Malformed)?)
            .ok_or(ElfError::Malformed)?;
        if entsize < 24 {
            return Err(ElfError::Malformed);
        }
        let syms = b
            .get(off..off.checked_add(size).ok_or(ElfError::Malformed)?)
            .ok_or(ElfError::Malformed)?;
        for sym in syms.chunks_exact(entsize) {
            let name_off = usize_of(u64::from(u32_at(sym, 0)?))?;
            let shndx = u16_at(sym, 6)?;
            if shndx == 0 {
                continue; // undefined: imported, not exported
            }
            let Some(rest) = strtab.get(name_off..) else {
                return Err(ElfError::Malformed);
            };
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            if &rest[..end] == name.as_bytes() {
                return Ok(true);
            }
        }
        return Ok(false);
    }
    Err(ElfError::NoDynsym)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(exports(b"", "x"), Err(ElfError::NotElf));
        assert_eq!(exports(b"\x7fELF\x01\x01", "x"), Err(ElfError::Unsupported));
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[0x28] = 0xff; // section headers past the end
        h[0x3a] = 0x40;
        h[0x3c] = 3;
        assert_eq!(exports(&h, "x"), Err(ElfError::Malformed));
        for n in 0..64 {
            let _ = exports(&h[..n], "x");
        }
    }

    #[test]
    fn reads_this_test_binary() {
        // the test executable itself is an ELF file with a dynamic symbol table
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!exports(&exe, "no_such_symbol_anywhere").unwrap_or(false));
    }
}
