//! Feeds arbitrary text to the config parser and validator, alone and after a valid minimal
//! config (so validation of later sections is reached), and asserts:
//!
//! - `Config::from_toml` never panics;
//! - an error lists at least one problem, each non-empty and on one line (they are printed one
//!   per line by `oncegate check` and joined into one line by `run`);
//! - an accepted config can be printed with `{:?}`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use oncegate::config::Config;

const MINIMAL: &str = "[upstream]\nurl = \"http://127.0.0.1:9\"\n";

fuzz_target!(|data: &[u8]| {
    let input = String::from_utf8_lossy(data);
    check(&input);
    check(&format!("{MINIMAL}{input}"));
});

fn check(text: &str) {
    match Config::from_toml(text, Path::new("/etc/oncegate")) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            assert!(
                !errors.0.is_empty(),
                "an error without problems for {text:?}"
            );
            for problem in &errors.0 {
                assert!(!problem.trim().is_empty(), "empty problem for {text:?}");
                assert!(
                    !problem.contains('\n'),
                    "multi-line problem {problem:?} for {text:?}"
                );
            }
        }
    }
}
