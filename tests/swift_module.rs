//! The Swift package under bindings/swift, checked without a Swift toolchain:
//! - its `CConvoy` module map is loaded by clang's module machinery (which Swift's importer
//!   uses) the way SwiftPM does for a system-library target (`-fmodule-map-file`, the header
//!   folder from `pkg-config --cflags convoy`, here the repository's include/), and every
//!   function, struct type and enum constant of include/convoy.h is visible through
//!   `@import CConvoy` (Objective-C, as Swift imports on Apple platforms) and through
//!   `#pragma clang module import` (C);
//! - the Swift sources only name C functions, types and fields that the header declares,
//!   pass `MemoryLayout.stride` (C's sizeof) as struct sizes, and restate the header's status
//!   and finish-reason values correctly; the package manifest and module map say what the
//!   package relies on.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn swift_dir() -> PathBuf {
    root().join("bindings/swift")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `src` without /* */ and // comments (string literals are not special: neither the header
/// nor the checks below need them).
fn strip_comments(src: &str) -> String {
    let (mut out, mut rest) = (String::new(), src);
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |end| &after[end + 2..]);
            out.push(' ');
        } else if rest.starts_with("//") {
            rest = rest.find('\n').map_or("", |end| &rest[end..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Identifiers of `src` with the byte offset just past each.
fn identifiers(src: &str) -> Vec<(&str, usize)> {
    let bytes = src.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if is_ident(bytes[i]) && (i == 0 || !is_ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            if !bytes[start].is_ascii_digit() {
                out.push((&src[start..i], i));
            }
        } else {
            i += 1;
        }
    }
    out
}

struct Header {
    /// Functions: `convoy_x` followed by `(`.
    functions: BTreeSet<String>,
    /// Struct typedef names (`} convoy_x;`).
    structs: BTreeSet<String>,
    /// Every `convoy_` identifier (functions, types, callback typedef).
    names: BTreeSet<String>,
    /// Every identifier (field names among them).
    all_identifiers: BTreeSet<String>,
    /// Enum constants and their values (`CONVOY_X = N`).
    constants: Vec<(String, u64)>,
}

fn header() -> Header {
    let code = strip_comments(&read(&root().join("include/convoy.h")));
    let mut h = Header {
        functions: BTreeSet::new(),
        structs: BTreeSet::new(),
        names: BTreeSet::new(),
        all_identifiers: BTreeSet::new(),
        constants: Vec::new(),
    };
    for (name, end) in identifiers(&code) {
        h.all_identifiers.insert(name.to_owned());
        let after = code[end..].trim_start();
        if name.starts_with("convoy_") {
            h.names.insert(name.to_owned());
            if after.starts_with('(') {
                h.functions.insert(name.to_owned());
            }
            let before = code[..end - name.len()].trim_end();
            if before.ends_with('}') && after.starts_with(';') {
                h.structs.insert(name.to_owned());
            }
        }
        if name.starts_with("CONVOY_") {
            if let Some(value) = after.strip_prefix('=') {
                let digits: String = value
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                if let Ok(v) = digits.parse() {
                    h.constants.push((name.to_owned(), v));
                }
            }
        }
    }
    // Guards against a parser that silently finds nothing.
    for f in [
        "convoy_engine_create",
        "convoy_engine_poll_any",
        "convoy_engine_cancel",
        "convoy_last_error_message",
    ] {
        assert!(h.functions.contains(f), "header parse lost {f}");
    }
    assert!(h.functions.len() >= 25, "only {:?}", h.functions);
    assert!(h.structs.contains("convoy_event") && h.structs.contains("convoy_engine_config"));
    assert!(h
        .constants
        .iter()
        .any(|(n, v)| n == "CONVOY_STATUS_IO_ERROR" && *v == 17));
    h
}

fn require_clang() {
    let ok = Command::new("clang")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "`clang` is missing (the module-map check uses clang's modules, like Swift's importer): \
         run scripts/setup.sh (make test does) to install it (apt package clang)"
    );
}

/// A translation unit that takes the address of every function, declares a variable of every
/// struct type and uses every enum constant and the version macros: it compiles only if the
/// module exports all of them. `import` is the line that imports the module (or nothing).
fn probe_source(h: &Header, import: &str) -> String {
    let mut src = format!("{import}\n\nstatic void (*const functions[])(void) = {{\n");
    for f in &h.functions {
        src += &format!("    (void (*)(void)){f},\n");
    }
    src += "};\n\nstatic const unsigned long long constants[] = {\n";
    for (c, _) in &h.constants {
        src += &format!("    (unsigned long long){c},\n");
    }
    src += "    CONVOY_ABI_VERSION, CONVOY_VERSION_MAJOR,\n};\n\n";
    src += "int main(void) {\n    convoy_engine *engine = 0;\n    convoy_log_callback log = 0;\n";
    for (i, s) in h.structs.iter().enumerate() {
        src += &format!("    {s} s{i};\n    (void)s{i};\n");
    }
    src += "    const char *version = CONVOY_VERSION;\n";
    src += "    (void)engine; (void)log; (void)version; (void)functions; (void)constants;\n";
    src += "    return 0;\n}\n";
    src
}

/// clang -fsyntax-only with the package's module map, as SwiftPM passes it.
fn clang_modules(dir: &Path, file: &str, lang: &[&str]) -> std::process::Output {
    Command::new("clang")
        .args(lang)
        .args(["-fmodules", "-fsyntax-only", "-Werror", "-Wall"])
        .arg(format!(
            "-fmodules-cache-path={}",
            dir.join("module-cache").display()
        ))
        .arg(format!(
            "-fmodule-map-file={}",
            swift_dir()
                .join("Sources/CConvoy/module.modulemap")
                .display()
        ))
        .arg(format!("-I{}", root().join("include").display()))
        .arg(dir.join(file))
        .output()
        .unwrap()
}

#[test]
fn every_c_declaration_is_visible_through_the_cconvoy_module() {
    require_clang();
    let h = header();
    let dir = tempfile::tempdir().unwrap();
    for (file, import, lang) in [
        ("probe.m", "@import CConvoy;", &["-x", "objective-c"][..]),
        (
            "probe.c",
            "#pragma clang module import CConvoy",
            &["-x", "c", "-std=c11"][..],
        ),
    ] {
        std::fs::write(dir.path().join(file), probe_source(&h, import)).unwrap();
        let out = clang_modules(dir.path(), file, lang);
        assert!(
            out.status.success(),
            "{file}: the CConvoy module does not export everything:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Control: without the import nothing is declared (the probe really tests the module).
    std::fs::write(dir.path().join("control.m"), probe_source(&h, "")).unwrap();
    let out = clang_modules(dir.path(), "control.m", &["-x", "objective-c"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("convoy_engine_create"));
}

#[test]
fn package_manifest_and_module_map() {
    let manifest = read(&swift_dir().join("Package.swift"));
    assert!(manifest.starts_with("// swift-tools-version:5.9"));
    for needle in [
        ".macOS(.v13)",
        ".systemLibrary(name: \"CConvoy\", pkgConfig: \"convoy\")",
        ".target(name: \"Convoy\", dependencies: [\"CConvoy\"])",
        ".testTarget(name: \"ConvoyTests\"",
    ] {
        assert!(manifest.contains(needle), "Package.swift lacks {needle}");
    }
    let modulemap = read(&swift_dir().join("Sources/CConvoy/module.modulemap"));
    for needle in [
        "module CConvoy [system]",
        "header \"shim.h\"",
        "link \"convoy\"",
    ] {
        assert!(
            modulemap.contains(needle),
            "module.modulemap lacks {needle}"
        );
    }
    let shim = strip_comments(&read(&swift_dir().join("Sources/CConvoy/shim.h")));
    assert_eq!(shim.trim(), "#include <convoy.h>");
    for f in [
        "Sources/Convoy/Convoy.swift",
        "Tests/ConvoyTests/ConvoyTests.swift",
        "README.md",
    ] {
        assert!(swift_dir().join(f).is_file(), "bindings/swift/{f} missing");
    }
}

fn swift_sources() -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for dir in ["Sources/Convoy", "Tests/ConvoyTests"] {
        for entry in std::fs::read_dir(swift_dir().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "swift") {
                let text = read(&path);
                out.push((path, text));
            }
        }
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn swift_sources_use_only_what_the_header_declares() {
    let h = header();
    let mut called = BTreeSet::new();
    for (path, text) in swift_sources() {
        let code = strip_comments(&text);
        for (name, end) in identifiers(&code) {
            let after = code[end..].trim_start();
            if name.starts_with("convoy_") {
                assert!(
                    h.names.contains(name),
                    "{}: {name} is not in convoy.h",
                    path.display()
                );
                // A call: `convoy_x(` but not a struct's zero initializer `convoy_event()`.
                if after.starts_with('(') && !after.starts_with("()") {
                    assert!(
                        h.functions.contains(name),
                        "{}: {name} is called but is not a function of convoy.h",
                        path.display()
                    );
                    called.insert(name.to_owned());
                }
                if after.starts_with("()") {
                    assert!(
                        h.structs.contains(name),
                        "{}: {name}() but {name} is not a struct of convoy.h",
                        path.display()
                    );
                }
            }
            // C struct fields (snake_case members): declared in the header.
            let start = end - name.len();
            if start > 0
                && code.as_bytes()[start - 1] == b'.'
                && name.contains('_')
                && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            {
                assert!(
                    h.all_identifiers.contains(name),
                    "{}: field .{name} is not in convoy.h",
                    path.display()
                );
            }
        }
        // struct_size arguments: C's sizeof is Swift's stride (size omits tail padding).
        assert!(
            !code.contains(">.size"),
            "{}: pass MemoryLayout<T>.stride as struct_size, not .size",
            path.display()
        );
        // Braces, brackets and parentheses balance (a crude syntax check; no strings here
        // contain them).
        for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
            let n_open = code.matches(open).count();
            let n_close = code.matches(close).count();
            assert_eq!(
                n_open,
                n_close,
                "{}: unbalanced {open}{close}",
                path.display()
            );
        }
    }
    // The dispatcher's contract: poll_any routes, cancel on termination, destroy after stop.
    for f in [
        "convoy_engine_create",
        "convoy_engine_destroy",
        "convoy_engine_poll_any",
        "convoy_engine_cancel",
        "convoy_engine_submit_text",
        "convoy_engine_submit_chat",
        "convoy_event_init",
        "convoy_last_error_message",
    ] {
        assert!(called.contains(f), "the Swift bindings never call {f}");
    }
}

/// Swift restates the header's numeric constants as `= N  // CONVOY_X`: each must equal the
/// header's value, and every status and finish reason must be there.
#[test]
fn swift_constants_match_the_header() {
    let h = header();
    let (_, text) = swift_sources()
        .into_iter()
        .find(|(p, _)| p.ends_with("Convoy.swift"))
        .unwrap();
    let mut restated = BTreeSet::new();
    for line in text.lines() {
        let Some((code, comment)) = line.split_once("//") else {
            continue;
        };
        let name = comment.trim();
        if !name.starts_with("CONVOY_") {
            continue;
        }
        let value: u64 = code
            .rsplit_once('=')
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `= N` before // {name}: {line}"));
        let (_, want) = h
            .constants
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not a constant of convoy.h"));
        assert_eq!(value, *want, "{name}: Swift says {value}, convoy.h {want}");
        restated.insert(name.to_owned());
    }
    for (name, _) in &h.constants {
        if name.starts_with("CONVOY_STATUS_") || name.starts_with("CONVOY_FINISH_REASON_") {
            assert!(
                restated.contains(name),
                "Convoy.swift does not restate {name}"
            );
        }
    }
    assert!(restated.contains("CONVOY_EVENT_KIND_FINISHED"));
}
