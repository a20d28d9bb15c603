//! Builds the guests in guests/ (with the machine's gcc/as/ld) so that `v3 run` can boot the
//! bundled demo guest and the tests can find the test guests. Missing tools are a warning here;
//! `v3 run` without arguments then says what is missing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guests = manifest
        .join("../../guests")
        .canonicalize()
        .expect("guests/ directory");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    println!("cargo:rerun-if-changed={}", guests.display());
    println!("cargo:rustc-env=PALACIOS_GUEST_DIR={}", out.display());
    println!("cargo:rustc-check-cfg=cfg(palacios_demo)");
    let status = Command::new("bash")
        .arg(guests.join("build.sh"))
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() && out.join("demo.elf").is_file() => {
            println!("cargo:rustc-cfg=palacios_demo")
        }
        Ok(s) => println!(
            "cargo:warning=building the guests failed ({s}); `v3 run` without a config will not have a demo guest"
        ),
        Err(e) => println!("cargo:warning=cannot run guests/build.sh: {e}"),
    }
}
