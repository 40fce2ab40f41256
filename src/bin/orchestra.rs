//! The `orchestra` command-line tool.
fn main() {}
