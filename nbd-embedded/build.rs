//! Says, in `cargo build`/`cargo test` output, which tests will be skipped
//! because a program they drive is not installed (as nbd-std/build.rs does
//! for its interop tests).
//!
//! The tests check with `tool(..)`/`installed(..)` (tests/common/tools.rs)
//! and, when a program is missing, print "skipping" on stderr and pass,
//! which `cargo test` captures: without this script a machine lacking
//! qemu or nbdinfo reports those tests as "ok". Under `NBD_REQUIRE_TOOLS=1`
//! (CI) they fail instead, and the warning says so.
//!
//! A test file needs a program when it names it in quotes (`tool("nbdinfo")`,
//! a list of prerequisites); the programs are the ones below. The script
//! reruns when `PATH`, `NBD_REQUIRE_TOOLS` or a test file changes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Programs the tests run; a quoted one in a test file is a need.
const PROGRAMS: &[&str] = &[
    "nbdinfo",
    "nbdcopy",
    "qemu-io",
    "qemu-system-arm",
    "defmt-print",
    "ip",
];

/// Where tools are looked for besides `PATH` (sbin, which a non-root
/// `PATH` may lack).
const EXTRA_TOOL_DIRS: &[&str] = &["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/sbin"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=tests");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=NBD_REQUIRE_TOOLS");

    let needs = program_needs(Path::new("tests"));
    let dirs = tool_dirs();
    let missing: BTreeMap<&str, &BTreeSet<String>> = needs
        .iter()
        .filter(|(program, _)| !dirs.iter().any(|dir| is_executable(&dir.join(program))))
        .map(|(program, tests)| (*program, tests))
        .collect();
    if missing.is_empty() {
        return;
    }
    let required = std::env::var("NBD_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    let fate = if required {
        "will FAIL (NBD_REQUIRE_TOOLS=1)"
    } else {
        "will print \"skipping\" and pass"
    };
    println!(
        "cargo:warning=nbd-embedded tests need programs that are not installed; \
         those tests {fate}. Install them as .ci/run does (APT_PACKAGES)."
    );
    for (program, tests) in missing {
        let tests: Vec<&str> = tests.iter().map(String::as_str).collect();
        println!("cargo:warning=missing {program}: {}", tests.join(", "));
    }
}

/// Program → the test files (targets) that name it.
fn program_needs(tests: &Path) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut needs: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(tests) else {
        return needs;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let (Some(target), Ok(text)) = (path.file_stem(), fs::read_to_string(&path)) else {
            continue;
        };
        for program in PROGRAMS {
            if text.contains(&format!("\"{program}\"")) {
                needs
                    .entry(program)
                    .or_default()
                    .insert(target.to_string_lossy().into_owned());
            }
        }
    }
    needs
}

fn tool_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_TOOL_DIRS.iter().map(PathBuf::from))
        .collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
