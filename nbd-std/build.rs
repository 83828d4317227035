//! Says, in `cargo build`/`cargo test` output, which interop tests will be
//! skipped because a program they drive is not installed.
//!
//! The tests themselves check with `have_tools(&[...])` (tests/common) and,
//! when a tool is missing, print `SKIPPED` and pass, which `cargo test`
//! captures: without this script a machine lacking nbdinfo or qemu reports
//! every interop test as "ok". Under `NBD_REQUIRE_TOOLS=1` (CI) those tests
//! fail instead, and the warning says so.
//!
//! The tests are read, not listed here, so the warning follows them: every
//! `have_tools(&["a", "b"])`, `have_tools(CONSTANT)` and
//! `have_python_libnbd()` call is attributed to the function it is in.
//!
//! The script reruns when `PATH` or `NBD_REQUIRE_TOOLS` changes, or when
//! something is installed into a directory a missing tool would go to (so
//! the library is not rebuilt on every test edit; a test that starts using
//! a new tool is listed after the next rerun).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where tests/common looks besides `PATH` (sbin, which a non-root `PATH`
/// may lack); keep in step with `EXTRA_TOOL_DIRS` there.
const EXTRA_TOOL_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// The interpreter python3-libnbd is installed for (tests/common's
/// `DEBIAN_PYTHON`).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// Tests named per missing tool; the rest are counted (nbdinfo alone
/// has dozens).
const SHOWN_USERS: usize = 4;

/// Pseudo tool name of `have_python_libnbd()`.
const PYTHON_LIBNBD: &str = "python3-libnbd";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=NBD_REQUIRE_TOOLS");

    let tests = Path::new("tests");
    let needs = tool_needs(tests);
    let dirs = tool_dirs();
    let mut missing: BTreeMap<&str, &BTreeSet<String>> = BTreeMap::new();
    for (tool, users) in &needs {
        let found = if tool == PYTHON_LIBNBD {
            python_libnbd_installed()
        } else {
            dirs.iter().any(|dir| is_executable(&dir.join(tool)))
        };
        if !found {
            missing.insert(tool, users);
        }
    }
    if missing.is_empty() {
        return;
    }
    // Installing a tool touches its directory: rerun then, and only then.
    for dir in dirs.iter().filter(|dir| dir.is_dir()) {
        println!("cargo:rerun-if-changed={}", dir.display());
    }

    let required = std::env::var("NBD_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    let fate = if required {
        "will FAIL (NBD_REQUIRE_TOOLS=1)"
    } else {
        "will print SKIPPED and pass"
    };
    println!(
        "cargo:warning=interop tests need programs that are not installed; \
         their tests {fate}. Install them as .ci/run does (APT_PACKAGES)."
    );
    for (tool, users) in missing {
        let shown: Vec<&str> = users.iter().take(SHOWN_USERS).map(String::as_str).collect();
        let more = match users.len().saturating_sub(SHOWN_USERS) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        println!("cargo:warning=missing {tool}: {}{more}", shown.join(", "));
    }
}

/// Directories searched for tools, as tests/common's `find_tool` does.
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

fn python_libnbd_installed() -> bool {
    Command::new(DEBIAN_PYTHON)
        .args(["-c", "import nbd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Tool name → the `test_file::function` names that check for it, from
/// the sources under `tests` (empty when they are absent).
fn tool_needs(tests: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut sources = Vec::new();
    collect_sources(tests, &mut sources);
    sources.sort();
    let texts: Vec<(PathBuf, String)> = sources
        .into_iter()
        .filter_map(|path| fs::read_to_string(&path).ok().map(|text| (path, text)))
        .collect();

    // `const NAME: &[&str] = &["a", ...];` anywhere, for have_tools(NAME).
    let mut constants: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, text) in &texts {
        let mut rest = text.as_str();
        while let Some(at) = rest.find("const ") {
            rest = &rest[at + "const ".len()..];
            let Some((name, tail)) = rest.split_once(": &[&str] = &[") else {
                continue;
            };
            if name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                let list = tail.split(']').next().unwrap_or_default();
                constants.insert(name.to_owned(), quoted(list));
            }
        }
    }

    // Tools checked in helpers under tests/common are attributed to the
    // tests calling the helper (`Pki::new()`, `GuestKit::prepare()`).
    let mut helpers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut needs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &texts {
        let target = test_target(tests, path);
        let in_common = target.starts_with("common");
        let (mut function, mut owner) = (String::from("?"), None::<String>);
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("impl ") {
                owner = name.split([' ', '<', '{']).next().map(str::to_owned);
            } else if !line.starts_with([' ', '}']) && !line.is_empty() {
                owner = None;
            }
            if let Some(name) = function_name(line) {
                function = match (&owner, line.starts_with(' ')) {
                    (Some(owner), true) => format!("{owner}::{name}"),
                    _ => name,
                };
            }
            if line.trim_start().starts_with("//") {
                continue;
            }
            let user = format!("{target}::{function}");
            let mut tools = Vec::new();
            if line.contains("have_python_libnbd()") && !line.contains("fn have_python_libnbd") {
                tools.push(PYTHON_LIBNBD.to_owned());
            }
            let mut rest = line;
            while let Some(at) = rest.find("have_tools(") {
                rest = &rest[at + "have_tools(".len()..];
                let argument = rest.split(')').next().unwrap_or_default().trim();
                if let Some(list) = argument.strip_prefix("&[") {
                    tools.extend(quoted(list.split(']').next().unwrap_or_default()));
                } else if let Some(list) = constants.get(argument) {
                    tools.extend(list.iter().cloned());
                }
            }
            for tool in tools {
                if in_common {
                    helpers.entry(function.clone()).or_default().insert(tool);
                } else {
                    needs.entry(tool).or_default().insert(user.clone());
                }
            }
        }
    }
    for (path, text) in &texts {
        let target = test_target(tests, path);
        if target.starts_with("common") {
            continue;
        }
        let mut function = String::from("?");
        for line in text.lines() {
            if let Some(name) = function_name(line) {
                function = name;
            }
            for (helper, tools) in &helpers {
                if calls(line, helper) {
                    for tool in tools {
                        let user = format!("{target}::{function}");
                        needs.entry(tool.clone()).or_default().insert(user);
                    }
                }
            }
        }
    }
    needs
}

/// Whether `line` calls `function` (`name` or `Type::name`).
fn calls(line: &str, function: &str) -> bool {
    let call = format!("{function}(");
    line.match_indices(&call).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

fn collect_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `tests/nbdinfo.rs` → `nbdinfo`; `tests/common/guest.rs` → `common/guest`.
fn test_target(tests: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(tests).unwrap_or(path).with_extension("");
    relative.to_string_lossy().into_owned()
}

/// The name of the function a line starts, if it does.
fn function_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    let line = line.strip_prefix("pub ").unwrap_or(line);
    let line = line.strip_prefix("async ").unwrap_or(line);
    let name = line.strip_prefix("fn ")?;
    let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(name[..end].to_owned())
}

/// The string literals in `list` (`"a", "b"`).
fn quoted(list: &str) -> Vec<String> {
    list.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}
