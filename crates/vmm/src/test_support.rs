//! How tests report a missing prerequisite, shared by every crate's tests.
//!
//! The test harness captures `eprintln!` of a passing test, so a skip printed that way is
//! invisible. These helpers write straight to the process's stderr, which the harness does not
//! capture, so a skip shows in the test output. Under CI (`CI` set to anything but `false`
//! or `0`) a missing prerequisite that the project can provide (a guest image, a tool) fails the
//! test instead: a green CI run must have tested what it claims.

use std::io::Write;

/// True when running under CI (`CI=true`, as CI systems and `.ci/run` set it).
pub fn under_ci() -> bool {
    is_ci(std::env::var("CI").ok().as_deref())
}

fn is_ci(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Print a line the harness does not capture.
pub fn visible(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

/// A prerequisite the project provides (a guest image, a tool) is missing. Under CI the test
/// fails with `reason`; elsewhere a visible `SKIP:` line is printed and the caller returns.
pub fn missing_prerequisite(test: &str, reason: &str) {
    visible(&report_missing(under_ci(), test, reason));
}

/// Panics under CI; otherwise the SKIP line to print.
fn report_missing(ci: bool, test: &str, reason: &str) -> String {
    if ci {
        panic!(
            "{test}: prerequisite missing under CI (CI is set, so this fails instead of skipping): {reason}"
        );
    }
    format!("SKIP: {test}: {reason}")
}

/// A capability of the machine (KVM, the host architecture) is missing: a visible skip, also
/// under CI, unless `PALACIOS_REQUIRE_KVM=1` asks for KVM to be there.
pub fn skip_machine(test: &str, reason: &str) {
    if std::env::var("PALACIOS_REQUIRE_KVM").is_ok_and(|v| v == "1") && reason.contains("KVM") {
        panic!("{test}: PALACIOS_REQUIRE_KVM=1 but {reason}");
    }
    visible(&format!("SKIP: {test}: {reason}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ci_is_recognised_from_the_variable() {
        assert!(is_ci(Some("true")));
        assert!(is_ci(Some("1")));
        assert!(!is_ci(Some("false")));
        assert!(!is_ci(Some("0")));
        assert!(!is_ci(Some("")));
        assert!(!is_ci(None));
    }

    #[test]
    fn a_missing_prerequisite_fails_under_ci_with_the_reason() {
        let r = std::panic::catch_unwind(|| report_missing(true, "t", "no guest image"));
        let msg = r.expect_err("must fail under CI");
        let text = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("no guest image"), "{text}");
        assert!(text.contains("prerequisite missing under CI"), "{text}");
        // Outside CI it returns the SKIP line (printed uncaptured) and the caller skips.
        assert_eq!(
            report_missing(false, "t", "no guest image"),
            "SKIP: t: no guest image"
        );
    }
}

/// Guest RAM of `size` bytes at address 0, for unit tests of code that reads guest memory.
pub fn guest_mem(size: usize) -> crate::GuestMem {
    vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), size)])
        .expect("allocate test guest memory")
}
