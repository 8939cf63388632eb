//! The `ftvm` binary as a user meets it: every command answers `--help`,
//! and a command line that makes no sense is refused with clap's exit 2.
//! (Being an integration test of this package also makes `cargo test`
//! build `target/*/ftvm`, which the end-to-end tests in `tests/` start.)

use std::process::Command;

const COMMANDS: [&[&str]; 12] = [
    &[],
    &["run"],
    &["record"],
    &["replay"],
    &["log", "dump"],
    &["log", "load"],
    &["primary"],
    &["backup"],
    &["arbiter"],
    &["kv"],
    &["demo"],
    &["bench"],
];

#[test]
fn every_command_answers_help() {
    for words in COMMANDS {
        let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(words)
            .arg("--help")
            .output()
            .expect("run ftvm");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ftvm {words:?} --help: {out:?}");
        assert!(
            text.contains("Usage: ftvm"),
            "ftvm {words:?} --help: {text}"
        );
    }
}

#[test]
fn an_unknown_command_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("no-such-command")
        .output()
        .expect("run ftvm");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-command"));
}
