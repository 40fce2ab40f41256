//! Every suite function is listed in its macro: a `pub async fn name(b: &Backends)` that
//! `conformance_suite!` or `engine_suite!` does not name would never run on any backend, and
//! nothing else would notice.

use std::collections::BTreeSet;

/// The suite modules: their name in the macros, their source, and the macro that lists them
/// with that macro's source.
const SUITES: &[(&str, &str, &str, &str)] = &[
    (
        "bus",
        include_str!("bus.rs"),
        "conformance_suite",
        include_str!("mod.rs"),
    ),
    (
        "registry",
        include_str!("registry.rs"),
        "conformance_suite",
        include_str!("mod.rs"),
    ),
    (
        "tasks",
        include_str!("tasks.rs"),
        "conformance_suite",
        include_str!("mod.rs"),
    ),
    (
        "locks",
        include_str!("locks.rs"),
        "conformance_suite",
        include_str!("mod.rs"),
    ),
    (
        "engine",
        include_str!("engine.rs"),
        "engine_suite",
        include_str!("engine.rs"),
    ),
    (
        "control",
        include_str!("control.rs"),
        "conformance_suite",
        include_str!("mod.rs"),
    ),
    (
        "engine_control",
        include_str!("engine_control.rs"),
        "engine_suite",
        include_str!("engine.rs"),
    ),
    (
        "options",
        include_str!("options.rs"),
        "engine_suite",
        include_str!("engine.rs"),
    ),
    (
        "engine_limits",
        include_str!("engine_limits.rs"),
        "engine_suite",
        include_str!("engine.rs"),
    ),
    (
        "schedule",
        include_str!("schedule.rs"),
        "engine_suite",
        include_str!("engine.rs"),
    ),
];

/// The names of the `pub async fn name(...)` in `source` whose parameters take the backends.
fn suite_functions(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("pub async fn ") {
        rest = &rest[at + "pub async fn ".len()..];
        let Some(open) = rest.find('(') else { break };
        let name = rest[..open].trim();
        let params = rest[open..].split(')').next().unwrap_or("");
        if params.contains("Backends") && !name.contains('<') {
            out.insert(name.to_string());
        }
    }
    out
}

/// The names `macro_rules! <macro_name>` in `source` lists under `module: [ ... ]`, in order
/// (duplicates kept).
fn listed(source: &str, macro_name: &str, module: &str) -> Vec<String> {
    let start = source
        .find(&format!("macro_rules! {macro_name}"))
        .unwrap_or_else(|| panic!("no macro_rules! {macro_name} in its source"));
    let body = &source[start..];
    // The macro's body ends where the next macro starts.
    let body = match body[1..].find("macro_rules!") {
        Some(end) => &body[..end + 1],
        None => body,
    };
    let key = format!("{module}: [");
    let Some(at) = body.find(&key) else {
        return Vec::new();
    };
    let list = &body[at + key.len()..];
    let list = &list[..list.find(']').expect("the list ends")];
    list.split(',')
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// What is wrong with the lists, one line per problem (empty when all is well).
fn problems(suites: &[(&str, &str, &str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    for (module, source, macro_name, macro_source) in suites {
        let functions = suite_functions(source);
        let names = listed(macro_source, macro_name, module);
        let set: BTreeSet<String> = names.iter().cloned().collect();
        if set.len() != names.len() {
            out.push(format!(
                "{macro_name}! lists a {module} function twice: {names:?}"
            ));
        }
        let missing: Vec<&String> = functions.difference(&set).collect();
        if !missing.is_empty() {
            out.push(format!(
                "{macro_name}! does not list these functions of testkit::{module}, so no backend \
                 runs them: {missing:?}"
            ));
        }
        let unknown: Vec<&String> = set.difference(&functions).collect();
        if !unknown.is_empty() {
            out.push(format!(
                "{macro_name}! lists under {module} what is no suite function there: {unknown:?}"
            ));
        }
    }
    out
}

#[test]
fn every_suite_function_is_listed_in_its_macro() {
    let found = problems(SUITES);
    assert!(found.is_empty(), "{}", found.join("\n"));
    // The parsing found something (an empty source would pass the comparison).
    for (module, source, ..) in SUITES {
        assert!(
            suite_functions(source).len() >= 3,
            "the parser found no suite functions in testkit::{module}"
        );
    }
}

#[test]
fn a_function_missing_from_its_macro_is_named() {
    let source = "pub async fn listed_one(b: &Backends) {}\n\
                  pub async fn forgotten_one(\n    b: &Backends,\n) {}\n\
                  pub async fn helper_taking_no_backends(x: u32) {}\n";
    let macro_source = "macro_rules! conformance_suite {\n bus: [\n listed_one,\n ];\n}\n\
                        macro_rules! other { bus: [ forgotten_one ]; }";
    let found = problems(&[("bus", source, "conformance_suite", macro_source)]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("forgotten_one"), "{found:?}");
    assert!(!found[0].contains("helper_taking_no_backends"), "{found:?}");
}
