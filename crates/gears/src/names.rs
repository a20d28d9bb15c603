//! System-call names of an x86-64 Linux guest, for rules and logs: (name, SYSCALL number,
//! INT 0x80 number). A rule may also give numbers; a number applies to the ABI it is given for.

/// (name, x86-64 number, i386 number).
const TABLE: &[(&str, u32, Option<u32>)] = &[
    ("read", 0, Some(3)),
    ("write", 1, Some(4)),
    ("open", 2, Some(5)),
    ("close", 3, Some(6)),
    ("stat", 4, Some(106)),
    ("fstat", 5, Some(108)),
    ("lstat", 6, Some(107)),
    ("poll", 7, Some(168)),
    ("lseek", 8, Some(19)),
    ("mmap", 9, None),
    ("mprotect", 10, Some(125)),
    ("munmap", 11, Some(91)),
    ("brk", 12, Some(45)),
    ("rt_sigaction", 13, Some(174)),
    ("rt_sigprocmask", 14, Some(175)),
    ("ioctl", 16, Some(54)),
    ("pread64", 17, Some(180)),
    ("pwrite64", 18, Some(181)),
    ("readv", 19, Some(145)),
    ("writev", 20, Some(146)),
    ("access", 21, Some(33)),
    ("pipe", 22, Some(42)),
    ("select", 23, None),
    ("sched_yield", 24, Some(158)),
    ("nanosleep", 35, Some(162)),
    ("getpid", 39, Some(20)),
    ("socket", 41, Some(359)),
    ("connect", 42, Some(362)),
    ("clone", 56, Some(120)),
    ("fork", 57, Some(2)),
    ("vfork", 58, Some(190)),
    ("execve", 59, Some(11)),
    ("exit", 60, Some(1)),
    ("wait4", 61, Some(114)),
    ("kill", 62, Some(37)),
    ("uname", 63, Some(122)),
    ("fcntl", 72, Some(55)),
    ("getcwd", 79, Some(183)),
    ("chdir", 80, Some(12)),
    ("mkdir", 83, Some(39)),
    ("unlink", 87, Some(10)),
    ("getuid", 102, Some(199)),
    ("getppid", 110, Some(64)),
    ("arch_prctl", 158, None),
    ("gettid", 186, Some(224)),
    ("futex", 202, Some(240)),
    ("getdents64", 217, Some(220)),
    ("clock_gettime", 228, Some(403)),
    ("exit_group", 231, Some(252)),
    ("openat", 257, Some(295)),
    ("newfstatat", 262, None),
    ("pselect6", 270, Some(308)),
    ("ppoll", 271, Some(309)),
    ("pipe2", 293, Some(331)),
    ("prlimit64", 302, Some(340)),
    ("getrandom", 318, Some(355)),
    ("execveat", 322, Some(358)),
    ("statx", 332, Some(383)),
];

/// The (SYSCALL, INT 0x80) numbers of `name`; a plain number (decimal or 0x hex) is taken for
/// both ABIs, `64:N` or `32:N` for one.
pub fn parse(name: &str) -> Result<(Option<u32>, Option<u32>), String> {
    let num = |s: &str| -> Result<u32, String> {
        let v = match s.strip_prefix("0x") {
            Some(h) => u32::from_str_radix(h, 16),
            None => s.parse(),
        }
        .map_err(|_| format!("'{s}' is not a system-call number"))?;
        if v >= 512 {
            return Err(format!("system-call number {v} is out of range (0-511)"));
        }
        Ok(v)
    };
    if let Some(n) = name.strip_prefix("64:") {
        return Ok((Some(num(n)?), None));
    }
    if let Some(n) = name.strip_prefix("32:") {
        return Ok((None, Some(num(n)?)));
    }
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        let n = num(name)?;
        return Ok((Some(n), Some(n)));
    }
    TABLE
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, b)| (Some(*a), *b))
        .ok_or_else(|| {
            format!(
                "unknown system call '{name}' (give a number, or one of: {})",
                TABLE.iter().map(|t| t.0).collect::<Vec<_>>().join(" ")
            )
        })
}

/// The name of SYSCALL number `nr` (`int80`: of INT 0x80 number `nr`), or the number.
pub fn name(nr: u64, int80: bool) -> String {
    TABLE
        .iter()
        .find(|(_, a, b)| {
            if int80 {
                b.map(u64::from) == Some(nr)
            } else {
                u64::from(*a) == nr
            }
        })
        .map(|t| t.0.to_string())
        .unwrap_or_else(|| nr.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_abis() {
        assert_eq!(parse("write").unwrap(), (Some(1), Some(4)));
        assert_eq!(parse("mmap").unwrap(), (Some(9), None));
        assert_eq!(parse("0x3b").unwrap(), (Some(59), Some(59)));
        assert_eq!(parse("32:4").unwrap(), (None, Some(4)));
        assert!(parse("nosuch").unwrap_err().contains("unknown system call"));
        assert!(parse("600").unwrap_err().contains("out of range"));
        assert_eq!(name(1, false), "write");
        assert_eq!(name(4, true), "write");
        assert_eq!(name(499, false), "499");
    }
}
