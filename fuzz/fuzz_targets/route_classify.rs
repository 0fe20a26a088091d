//! Feeds arbitrary strings to the archive route check (the default template and a second
//! shape) and asserts the invariants of `oncegate::route`:
//!
//! - `classify` never panics, and `fold_case` changes only the key, never the verdict;
//! - an Archive only comes from a plain path: no '%', '\\', ';', "//", control or
//!   non-ASCII bytes, no dot segment, no trailing slash; and that path is the
//!   key's canonical path (exactly, or ignoring ASCII case when folding);
//! - an Archive's key survives `from_key_string`, and its canonical path
//!   classifies as the same Archive.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use oncegate::route::{ArchiveKey, RouteMatch, RouteTemplate};

const DEFAULT_ROUTE: &str = "/v2/{project_id}/instances/{instance_id}/assets/archives/{archive_id}";
/// A second shape: a literal segment after the last placeholder.
const OTHER_ROUTE: &str = "/files/{a}/{b}/raw";

fn templates() -> &'static [RouteTemplate; 2] {
    static TEMPLATES: OnceLock<[RouteTemplate; 2]> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        [DEFAULT_ROUTE, OTHER_ROUTE]
            .map(|route| RouteTemplate::parse(route).expect("the fuzzed route templates parse"))
    })
}

fuzz_target!(|data: &[u8]| {
    // Lossy conversion keeps every input useful; invalid bytes become U+FFFD.
    let input = String::from_utf8_lossy(data);
    let [default, other] = templates();
    // Besides the input itself, splice it where it reaches deep states quickly:
    // a placeholder position, and right after a literal prefix.
    for path in [
        input.to_string(),
        format!("/v2/p/instances/i/assets/archives/{input}"),
        format!("/v2/{input}"),
    ] {
        check(default, &path);
    }
    for path in [
        input.to_string(),
        format!("/files/x/{input}/raw"),
        format!("/files/{input}"),
    ] {
        check(other, &path);
    }
});

fn check(template: &RouteTemplate, path: &str) {
    let folded = template.classify(path, true);
    let exact = template.classify(path, false);
    match (&folded, &exact) {
        (RouteMatch::NotRoute, RouteMatch::NotRoute) => {}
        (RouteMatch::Reject(with_fold), RouteMatch::Reject(without_fold)) => {
            assert_eq!(
                with_fold, without_fold,
                "fold_case changed the rejection of {path:?}"
            );
        }
        (RouteMatch::Archive(with_fold), RouteMatch::Archive(without_fold)) => {
            assert_eq!(
                with_fold.as_str(),
                without_fold.as_str().to_ascii_lowercase(),
                "folded key of {path:?} is not the lowercase exact key"
            );
        }
        _ => panic!("fold_case changed the verdict on {path:?}: {folded:?} vs {exact:?}"),
    }
    check_archive(template, path, &folded, true);
    check_archive(template, path, &exact, false);
}

fn check_archive(template: &RouteTemplate, path: &str, verdict: &RouteMatch, fold_case: bool) {
    let RouteMatch::Archive(key) = verdict else {
        return;
    };
    assert!(
        is_plain(path),
        "Archive {key:?} from non-canonical path {path:?}"
    );

    for name in template.param_names() {
        let value = key
            .param(name)
            .unwrap_or_else(|| panic!("key {key:?} lacks {name}"));
        assert!(
            (1..=64).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-')),
            "bad parameter {name}={value:?} in key of {path:?}"
        );
        assert!(
            !(fold_case && value.bytes().any(|b| b.is_ascii_uppercase())),
            "unfolded parameter {name}={value:?} in key of {path:?}"
        );
    }

    assert_eq!(
        ArchiveKey::from_key_string(template, key.as_str()).as_ref(),
        Some(key),
        "key of {path:?} does not survive from_key_string"
    );

    let canonical = canonical_path(template, key);
    if fold_case {
        assert!(
            canonical.eq_ignore_ascii_case(path),
            "{path:?} is not {canonical:?}"
        );
    } else {
        assert_eq!(
            canonical, path,
            "Archive path is not the key's canonical path"
        );
    }
    assert_eq!(
        &template.classify(&canonical, fold_case),
        verdict,
        "canonical path {canonical:?} of {path:?} classifies differently"
    );
}

/// The form only a canonical archive path can have.
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && !path.ends_with('/')
        && !path.contains("//")
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'%' | b'\\' | b';' | b'#' | b'?'))
        && !path
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

/// The template with every placeholder replaced by the key's parameter.
fn canonical_path(template: &RouteTemplate, key: &ArchiveKey) -> String {
    template
        .as_str()
        .split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => key
                    .param(name)
                    .unwrap_or_else(|| panic!("key {key:?} lacks {name}")),
                None => segment,
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}
