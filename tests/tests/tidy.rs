//! Tidy checks: the mechanical parts of STYLE.md (sections 4, 5 and 9), read from the source tree.
//!
//! Each rule is its own test, so a failure names the rule; it prints every violation as
//! `path:line: what`. Needs no root and no built binaries: it only reads `.rs` files and
//! ARCHITECTURE.md. The idea is rust-analyzer's `xtask/src/tidy.rs`.
//!
//! The scanner is line based, after a small lexer has split every line into its code (string
//! and char literal contents blanked) and its comment text, so a keyword inside a string or a
//! comment never counts and a comment marker inside a string never starts a comment.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

/// The crates whose sources are checked, relative to the workspace root.
const CRATES: &[&str] = &[
    "dataplane-common",
    "dataplane-ebpf",
    "userspace",
    "init",
    "tests",
    "xtask",
];

/// How many code lines above an `unsafe` may sit between it and its `// SAFETY:` comment (a
/// statement or expression spread over several lines); comment lines do not count.
const MAX_CODE_LINES_ABOVE: usize = 6;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_path_buf()
}

/// One source file, split into lines of code and comment text.
struct Source {
    /// Relative to the workspace root, with `/` separators.
    path: String,
    lines: Vec<Line>,
}

#[derive(Default)]
struct Line {
    /// The line as written.
    raw: String,
    /// Code only: comments removed, the contents of string and char literals blanked.
    code: String,
    /// The text of the comments on this line (`//`, `///`, `//!` and block comments).
    comment: String,
}

impl Line {
    fn is_blank(&self) -> bool {
        self.raw.trim().is_empty()
    }

    /// Whether the line holds a comment and no code.
    fn is_comment_only(&self) -> bool {
        self.code.trim().is_empty() && !self.comment.trim().is_empty()
    }
}

fn sources() -> Vec<Source> {
    let root = root();
    let mut files = Vec::new();
    for krate in CRATES {
        collect(&root.join(krate), &mut files);
    }
    files.sort();
    assert!(
        files.len() > 10,
        "found only {} .rs files under {}",
        files.len(),
        root.display()
    );
    files
        .into_iter()
        .map(|file| {
            let text = fs::read_to_string(&file)
                .unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
            let path = file
                .strip_prefix(&root)
                .expect("collected under the root")
                .to_string_lossy()
                .replace('\\', "/");
            Source {
                path,
                lines: lex(&text),
            }
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let kind = entry
            .file_type()
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
        if kind.is_dir() {
            if name != "target" && !name.starts_with('.') {
                collect(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// Splits Rust source into lines of code and comment text. Handles line and (nested) block
/// comments, string literals with escapes, raw strings (`r#"…"#`), byte and C strings, char
/// literals and lifetimes; that is all a line-based check needs.
fn lex(text: &str) -> Vec<Line> {
    let chars: Vec<char> = text.chars().collect();
    let mut lines = vec![Line::default()];
    let mut i = 0;
    // Pushes a character of the given kind; a newline starts a new line in any state.
    fn push(lines: &mut Vec<Line>, c: char, code: bool, comment: bool) {
        if c == '\n' {
            lines.push(Line::default());
            return;
        }
        let line = lines.last_mut().expect("never empty");
        line.raw.push(c);
        line.code.push(if code { c } else { ' ' });
        if comment {
            line.comment.push(c);
        }
    }
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                push(&mut lines, chars[i], false, true);
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    push(&mut lines, '/', false, true);
                    push(&mut lines, '*', false, true);
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    push(&mut lines, '*', false, true);
                    push(&mut lines, '/', false, true);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    push(&mut lines, chars[i], false, true);
                    i += 1;
                }
            }
        } else if c == '"' || (c == 'r' && raw_string_hashes(&chars, i).is_some()) {
            // A prefix (`b`, `c`) is an identifier character and has already been pushed as code.
            let hashes = if c == 'r' {
                let n = raw_string_hashes(&chars, i).expect("checked");
                for _ in 0..=n {
                    push(&mut lines, chars[i], true, false);
                    i += 1;
                }
                Some(n)
            } else {
                None
            };
            push(&mut lines, '"', true, false);
            i += 1;
            while i < chars.len() {
                let d = chars[i];
                match hashes {
                    None if d == '\\' => {
                        push(&mut lines, d, false, false);
                        if i + 1 < chars.len() {
                            push(&mut lines, chars[i + 1], false, false);
                        }
                        i += 2;
                    }
                    None if d == '"' => {
                        push(&mut lines, d, true, false);
                        i += 1;
                        break;
                    }
                    Some(n) if d == '"' && (1..=n).all(|k| at(i + k) == '#') => {
                        for _ in 0..=n {
                            push(&mut lines, chars[i], true, false);
                            i += 1;
                        }
                        break;
                    }
                    _ => {
                        push(&mut lines, d, false, false);
                        i += 1;
                    }
                }
            }
        } else if c == '\'' {
            // A char literal (`'x'`, `'\n'`, `'\u{1F600}'`) or a lifetime or label (`'a`).
            let end = if at(i + 1) == '\\' {
                (i + 3..chars.len().min(i + 14)).find(|&k| chars[k] == '\'')
            } else if at(i + 2) == '\'' && at(i + 1) != '\n' {
                Some(i + 2)
            } else {
                None
            };
            if let Some(end) = end {
                push(&mut lines, '\'', true, false);
                for &d in &chars[i + 1..end] {
                    push(&mut lines, d, false, false);
                }
                push(&mut lines, '\'', true, false);
                i = end + 1;
            } else {
                push(&mut lines, c, true, false);
                i += 1;
            }
        } else if is_ident(c) {
            // Whole identifiers, so that `br"…"` or `for"` style prefixes are not misread and
            // an `r` inside an identifier never starts a raw string.
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // `r`, `br`, `cr` directly before `"` or `#"`: hand the `r` back to the loop.
            if (word == "r" || word == "br" || word == "cr")
                && raw_string_hashes(&chars, i - 1).is_some()
            {
                for &d in &chars[start..i - 1] {
                    push(&mut lines, d, true, false);
                }
                i -= 1;
                // The next iteration sees `r` and lexes the raw string.
                let c = chars[i];
                debug_assert_eq!(c, 'r');
                let n = raw_string_hashes(&chars, i).expect("checked");
                for _ in 0..=n {
                    push(&mut lines, chars[i], true, false);
                    i += 1;
                }
                push(&mut lines, '"', true, false);
                i += 1;
                while i < chars.len() {
                    if chars[i] == '"' && (1..=n).all(|k| at(i + k) == '#') {
                        for _ in 0..=n {
                            push(&mut lines, chars[i], true, false);
                            i += 1;
                        }
                        break;
                    }
                    push(&mut lines, chars[i], false, false);
                    i += 1;
                }
            } else {
                for &d in &chars[start..i] {
                    push(&mut lines, d, true, false);
                }
            }
        } else {
            push(&mut lines, c, true, false);
            i += 1;
        }
    }
    lines
}

/// When `chars[i]` is the `r` of a raw string (`r"`, `r#"`, …), the number of `#`s.
fn raw_string_hashes(chars: &[char], i: usize) -> Option<usize> {
    if chars.get(i) != Some(&'r') {
        return None;
    }
    // Not the tail of a longer identifier other than a `b`/`c` prefix.
    if i > 0 && is_ident(chars[i - 1]) {
        let prefix_ok = matches!(chars[i - 1], 'b' | 'c') && (i < 2 || !is_ident(chars[i - 2]));
        if !prefix_ok {
            return None;
        }
    }
    let mut n = 0;
    while chars.get(i + 1 + n) == Some(&'#') {
        n += 1;
    }
    (chars.get(i + 1 + n) == Some(&'"')).then_some(n)
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Byte offsets of `word` in `s` as a whole identifier.
fn word_positions<'a>(s: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    s.match_indices(word).filter_map(move |(at, _)| {
        let before = s[..at].chars().next_back();
        let after = s[at + word.len()..].chars().next();
        let boundary = |c: Option<char>| !c.is_some_and(is_ident);
        (boundary(before) && boundary(after)).then_some(at)
    })
}

fn report(rule: &str, violations: &[String]) {
    if violations.is_empty() {
        return;
    }
    let mut msg = format!("{rule}: {} violation(s)\n", violations.len());
    for v in violations {
        let _ = writeln!(msg, "{v}");
    }
    panic!("{msg}");
}

/// STYLE.md section 4: every `unsafe` block, `unsafe fn`, `unsafe impl`, `unsafe trait` and
/// `unsafe extern` has a `// SAFETY:` comment just above it (or after it on the same line);
/// an `unsafe fn` may instead have a `# Safety` section in its doc comment.
#[test]
fn unsafe_has_safety_comment() {
    let mut violations = Vec::new();
    for src in sources() {
        violations.extend(
            unsafe_violations(&src.lines)
                .into_iter()
                .map(|(line, what)| format!("{}:{}: {what}", src.path, line + 1)),
        );
    }
    report("unsafe without a `// SAFETY:` comment", &violations);
}

/// The lines (0-based) of `unsafe` uses without a SAFETY comment, and what each one is.
fn unsafe_violations(lines: &[Line]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        for at in word_positions(&line.code, "unsafe") {
            let rest = line.code[at + "unsafe".len()..].trim_start();
            // `#[unsafe(no_mangle)]` and friends: an attribute, not an unsafe operation.
            if rest.starts_with('(') {
                continue;
            }
            let what = if rest.starts_with("fn") && word_positions(rest, "fn").next() == Some(0) {
                // `unsafe fn(…)` as a type (a function pointer), as for `extern` below.
                if rest["fn".len()..].trim_start().starts_with('(') {
                    continue;
                }
                "unsafe fn"
            } else if rest.starts_with("impl") {
                "unsafe impl"
            } else if rest.starts_with("extern") {
                // `unsafe extern "C" fn(…)` as a type (a function pointer) carries no obligation
                // of its own: whoever calls through it writes the SAFETY comment.
                if is_fn_pointer_type(rest) {
                    continue;
                }
                "unsafe extern"
            } else if rest.starts_with("trait") {
                "unsafe trait"
            } else {
                "unsafe block"
            };
            if !has_safety_comment(lines, n, what == "unsafe fn") {
                out.push((n, format!("{what} without a `// SAFETY:` comment above it")));
            }
        }
    }
    out
}

/// `extern "C" fn(` with no name: a function pointer type.
fn is_fn_pointer_type(rest: &str) -> bool {
    let after_extern = rest["extern".len()..].trim_start();
    let after_abi = after_extern
        .strip_prefix('"')
        .and_then(|s| s.find('"').map(|end| &s[end + 1..]))
        .unwrap_or(after_extern)
        .trim_start();
    after_abi
        .strip_prefix("fn")
        .is_some_and(|s| s.trim_start().starts_with('('))
}

fn has_safety_comment(lines: &[Line], n: usize, is_fn: bool) -> bool {
    if lines[n].comment.contains("SAFETY:") {
        return true;
    }
    let mut code_lines = 0;
    for line in lines[..n].iter().rev() {
        if line.is_blank() {
            continue;
        }
        if line.is_comment_only() {
            if line.comment.contains("SAFETY:") {
                return true;
            }
            if is_fn && line.comment.trim_start().starts_with("///") {
                let doc = line.comment.trim_start().trim_start_matches('/').trim();
                if doc == "# Safety" {
                    return true;
                }
            }
            continue;
        }
        // A line with code: the comment above may still belong to us if this line is part of
        // the same statement (a multi-line call or chain, an `if let … {` head), or an
        // attribute of the same item. A finished statement or block ends the search.
        let code = line.code.trim_end();
        if code.ends_with(';') || code.ends_with('}') {
            return false;
        }
        if line.comment.contains("SAFETY:") {
            return true;
        }
        code_lines += 1;
        if code_lines >= MAX_CODE_LINES_ABOVE {
            return false;
        }
    }
    false
}

/// STYLE.md section 9 (comments): no to-do, fix-me or triple-x marker (see `MARKERS`) without
/// an issue reference (`#123` or `issue 123`) on the same line. Only comments are checked: a
/// marker inside a string literal is data.
#[test]
fn markers_have_issue_reference() {
    let mut violations = Vec::new();
    for src in sources() {
        for (n, line) in src.lines.iter().enumerate() {
            for marker in MARKERS {
                if word_positions(&line.comment, marker).next().is_some()
                    && !has_issue_reference(&line.comment)
                {
                    violations.push(format!(
                        "{}:{}: {marker} without an issue reference (`#123` or `issue 123`)",
                        src.path,
                        n + 1
                    ));
                }
            }
        }
    }
    report("marker without an issue reference", &violations);
}

/// Written as a list of halves so that this file does not flag itself.
const MARKERS: &[&str] = &[
    concat!("TO", "DO"),
    concat!("FIX", "ME"),
    concat!("X", "XX"),
];

fn has_issue_reference(s: &str) -> bool {
    let digits_at = |rest: &str| rest.starts_with(|c: char| c.is_ascii_digit());
    s.match_indices('#').any(|(at, _)| digits_at(&s[at + 1..]))
        || s.to_ascii_lowercase()
            .match_indices("issue ")
            .any(|(at, _)| digits_at(&s[at + "issue ".len()..]))
}

/// STYLE.md section 9: every file opens with a `//!` paragraph; inner attributes (`#![…]`, even
/// over several lines) may come first.
#[test]
fn files_open_with_module_doc() {
    let mut violations = Vec::new();
    for src in sources() {
        if let Err(line) = opens_with_module_doc(&src.lines) {
            violations.push(format!(
                "{}:{}: file does not open with a `//!` paragraph",
                src.path,
                line + 1
            ));
        }
    }
    report("file without a `//!` header", &violations);
}

/// `Err(line)` names the first line that is neither blank, an inner attribute nor `//!`.
fn opens_with_module_doc(lines: &[Line]) -> Result<(), usize> {
    let mut depth = 0i32;
    for (n, line) in lines.iter().enumerate() {
        let raw = line.raw.trim();
        if depth > 0 {
            depth += bracket_balance(&line.code);
            continue;
        }
        if raw.is_empty() {
            continue;
        }
        if raw.starts_with("//!") {
            return Ok(());
        }
        if raw.starts_with("#![") {
            depth = bracket_balance(&line.code);
            continue;
        }
        return Err(n);
    }
    Err(0)
}

fn bracket_balance(code: &str) -> i32 {
    code.chars()
        .map(|c| match c {
            '[' => 1,
            ']' => -1,
            _ => 0,
        })
        .sum()
}

/// STYLE.md section 9: ARCHITECTURE.md names every module. A file `x.rs` must appear as `x.rs`,
/// a `dir/mod.rs` as `dir/`; an integration test module may appear as `` `x` `` instead.
/// `main.rs`, `lib.rs` and build scripts are named by their crate.
#[test]
fn architecture_names_every_module() {
    let root = root();
    let arch = fs::read_to_string(root.join("ARCHITECTURE.md"))
        .unwrap_or_else(|e| panic!("read ARCHITECTURE.md: {e}"));
    let mut violations = Vec::new();
    for src in sources() {
        let path = Path::new(&src.path);
        let file = path.file_name().expect("a file").to_string_lossy();
        let is_build_script =
            file == "build.rs" && root.join(path).with_file_name("Cargo.toml").exists();
        if file == "main.rs" || file == "lib.rs" || is_build_script {
            continue;
        }
        let (needle, shown) = if file == "mod.rs" {
            let dir = path
                .parent()
                .and_then(Path::file_name)
                .expect("mod.rs sits in a directory")
                .to_string_lossy();
            (format!("{dir}/"), format!("`{dir}/`"))
        } else {
            (file.to_string(), format!("`{file}`"))
        };
        let mut found = mentions(&arch, &needle);
        let mut also = String::new();
        if !found && src.path.starts_with("tests/tests/integration/") && file != "mod.rs" {
            let stem = file.trim_end_matches(".rs");
            found = arch.contains(&format!("`{stem}`"));
            also = format!(" or `` `{stem}` ``");
        }
        if !found {
            violations.push(format!(
                "{}:1: ARCHITECTURE.md does not name {shown}{also}",
                src.path
            ));
        }
    }
    report("module missing from ARCHITECTURE.md", &violations);
}

/// Whether `needle` appears in `text` not as the tail of a longer name (`lock.rs` is not
/// named by `block.rs`).
fn mentions(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(at, _)| {
        !text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '-')
    })
}

/// The checker checks itself: the cases the scanner must get right.
#[test]
fn scanner_cases() {
    let bad = |src: &str| unsafe_violations(&lex(src)).len();
    // A block with its comment, including a multi-line comment whose first line says SAFETY.
    assert_eq!(bad("// SAFETY: fine.\nlet x = unsafe { f() };\n"), 0);
    assert_eq!(
        bad("// SAFETY: the first line,\n// and a second,\n// and a third.\nunsafe { f() };\n"),
        0
    );
    // A comment above a previous statement does not cover the next one.
    assert_eq!(bad("// SAFETY: a.\nunsafe { a() };\nunsafe { b() };\n"), 1);
    // Within one multi-line expression.
    assert_eq!(
        bad("// SAFETY: ok.\nfoo(\n    a,\n    unsafe { b() },\n);\n"),
        0
    );
    assert_eq!(
        bad("// SAFETY: ok.\nif let Some(p) = get() {\n    unsafe { *p }\n}\n"),
        0
    );
    assert_eq!(
        bad("// SAFETY: ok.\nunsafe { a() }\nif x {\n    unsafe { *p }\n}\n"),
        1
    );
    assert_eq!(
        bad("let x = 1; // SAFETY: not for the next line.\nunsafe { b() };\n"),
        1
    );
    assert_eq!(bad("unsafe { b() }; // SAFETY: trailing, same line.\n"), 0);
    assert_eq!(bad("// SAFETY: ok.\n\nunsafe { b() };\n"), 0);
    assert_eq!(bad("// SAFETY: ok.\nlet s = '\\'';\nunsafe { b() };\n"), 1);
    // Not code: attributes, strings, comments, lint names, raw strings.
    assert_eq!(bad("#[unsafe(no_mangle)]\nstatic X: u8 = 0;\n"), 0);
    assert_eq!(bad("let s = \"unsafe { }\";\n"), 0);
    assert_eq!(bad("let s = r#\"unsafe \" { }\"#;\n"), 0);
    assert_eq!(bad("let s = '\"'; let t = \"unsafe\";\n"), 0);
    assert_eq!(bad("// unsafe here\n/* unsafe\n unsafe */\n"), 0);
    assert_eq!(bad("#![deny(unsafe_op_in_unsafe_fn)]\n"), 0);
    assert_eq!(bad("fn f<'a>(x: &'a u8) {}\nlet y = unsafe { 1 };\n"), 1);
    // Items.
    assert_eq!(bad("unsafe impl Send for X {}\n"), 1);
    assert_eq!(
        bad("#[cfg(x)]\n// SAFETY: ok.\n#[link(name = \"c\")]\nunsafe extern \"C\" {}\n"),
        0
    );
    assert_eq!(
        bad("/// Does it.\n///\n/// # Safety\n///\n/// Callers must.\npub unsafe fn f() {}\n"),
        0
    );
    assert_eq!(bad("/// Does it.\npub unsafe fn f() {}\n"), 1);
    assert_eq!(bad("type F = unsafe extern \"C\" fn(i32);\n"), 0);
    assert_eq!(bad("type G = unsafe fn(i32);\n"), 0);
    assert_eq!(bad("unsafe trait T {}\n"), 1);

    assert!(has_issue_reference("see #12"));
    assert!(has_issue_reference("Issue 7: later"));
    assert!(!has_issue_reference("#[attr] later"));

    let doc = |src: &str| opens_with_module_doc(&lex(src)).is_ok();
    assert!(doc("\n//! Doc.\n"));
    assert!(doc(
        "#![no_std]\n#![cfg_attr(\n    x,\n    y\n)]\n//! Doc.\n"
    ));
    assert!(!doc("// Not doc.\n//! Doc.\n"));
    assert!(!doc("use x;\n"));

    assert!(mentions("`lock.rs` and", "lock.rs"));
    assert!(!mentions("`block.rs` and", "lock.rs"));
    assert!(mentions("(`services/`)", "services/"));
}
