//! Route template and the strict path check of SPEC §3.
//! Decides whether a request path is the archive route, and if so its canonical key or why it is rejected.
//!
//! The check runs in two stages:
//!
//! 1. *Route-shaped paths.* If the raw path, split on `/`, has the template's
//!    segment count and every literal matches ignoring ASCII case, it is the
//!    route: it yields an [`ArchiveKey`] when exactly canonical, otherwise a
//!    rejection (`ROMA.1007` before `ROMA.13000`). Only this stage can produce
//!    a key, and only from bytes that no upstream could read differently.
//! 2. *Readings.* Any other path is explored as "what the most permissive
//!    upstream could make of it": a breadth-first search over the distinct
//!    strings reachable by single rewrites (percent-decoding, `\` to `/`,
//!    dropping `;` parameters, merging slashes, resolving dot segments, cutting
//!    at `#`/`?`/`;`/NUL, Unicode compatibility forms, stripping tabs and
//!    newlines, dropping a `scheme://authority` prefix). Searching over orders
//!    rather than applying one fixed pipeline matters: dot resolution before
//!    decoding and after it give different paths, and either may be the
//!    route. A reading whose shape matches the template (literals compared
//!    ignoring case, parameters any segment) makes the path a rejected route.
//!
//! A path with none of the rewritable features skips stage 2: every rewrite
//! would be a no-op, so stage 1 already decided it. The search is bounded;
//! when the bound is hit a coarse, conservative test decides instead.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Longest accepted path parameter (SPEC §1).
const MAX_PARAM_LEN: usize = 64;

/// Distinct readings explored for one path before falling back to the coarse
/// test. Ordinary paths need a handful; only paths stacked with tricks get
/// near it, and those the fallback rejects as long as they still spell out the
/// template's literals in order. Bounds the worst case to well under 1 ms.
const MAX_READINGS: usize = 128;

/// Total bytes of readings explored for one path, so long hostile paths stay as cheap as short ones.
const MAX_READING_BYTES: usize = 32 * 1024;

/// Decode rounds the coarse fallback applies before giving up and treating the path as the route.
const MAX_FALLBACK_ROUNDS: usize = 16;

/// Stands for a byte that is not part of a valid UTF-8 sequence; matches no character.
const INVALID_CHAR: u32 = u32::MAX;

mod reason {
    pub const PERCENT: &str = "percent-encoded bytes in the path";
    pub const SEMICOLON: &str = "';' parameter in the path";
    pub const BACKSLASH: &str = "backslash in the path";
    pub const DELIMITER: &str = "fragment or query delimiter inside the path";
    pub const CONTROL: &str = "control character in the path";
    pub const NON_ASCII: &str = "non-ASCII byte in the path";
    pub const EMPTY_SEGMENT: &str = "empty path segment";
    pub const TRAILING_SLASH: &str = "trailing slash in the path";
    pub const DOT_SEGMENT: &str = "dot segment in the path";
    pub const LITERAL_CASE: &str = "path differs from the route template in letter case";
    pub const NOT_ORIGIN_FORM: &str = "request path does not start with '/'";
    pub const NOT_CANONICAL: &str = "path is not in canonical form";
    pub const TOO_LONG: &str = "path parameter longer than 64 characters";
    pub const BAD_CHARACTER: &str = "path parameter with characters outside [A-Za-z0-9._~-]";
}

/// A parsed route template: literal segments and whole-segment `{name}` placeholders.
#[derive(Debug, Clone)]
pub struct RouteTemplate {
    source: Box<str>,
    segments: Box<[Segment]>,
    /// Shared with every key so `ArchiveKey::param` works without a template at hand.
    param_names: Arc<[Box<str>]>,
}

/// Two templates are the same route when they were written the same.
impl PartialEq for RouteTemplate {
    fn eq(&self, other: &RouteTemplate) -> bool {
        self.source == other.source
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(Box<str>),
    Param,
}

impl RouteTemplate {
    /// Parses a template such as "/v2/{project_id}/instances/{instance_id}/assets/archives/{archive_id}".
    /// Errors (a one-line human message) when: not starting with '/', empty segment, trailing slash,
    /// a placeholder not being a whole segment, a placeholder name not [a-z_][a-z0-9_]*, duplicate names,
    /// no placeholder at all, a literal segment with characters outside [A-Za-z0-9._~-] or being "." / "..".
    pub fn parse(template: &str) -> Result<RouteTemplate, String> {
        let Some(rest) = template.strip_prefix('/') else {
            return Err(format!("route template {template:?} must start with '/'"));
        };
        let pieces: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(pieces.len());
        let mut names: Vec<Box<str>> = Vec::new();
        for (index, piece) in pieces.iter().enumerate() {
            if piece.is_empty() {
                return Err(if index + 1 == pieces.len() && index > 0 {
                    format!("route template {template:?} must not end with '/'")
                } else {
                    format!("route template {template:?} has an empty segment")
                });
            }
            if let Some(name) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.contains(['{', '}']) {
                    return Err(format!(
                        "route template {template:?}: placeholder {piece:?} must be a whole segment"
                    ));
                }
                if !is_placeholder_name(name) {
                    return Err(format!(
                        "route template {template:?}: placeholder name {name:?} must match [a-z_][a-z0-9_]*"
                    ));
                }
                if names.iter().any(|known| &**known == name) {
                    return Err(format!(
                        "route template {template:?}: placeholder {name:?} appears twice"
                    ));
                }
                names.push(name.into());
                segments.push(Segment::Param);
            } else if piece.contains(['{', '}']) {
                return Err(format!(
                    "route template {template:?}: placeholder in {piece:?} must be a whole segment"
                ));
            } else if *piece == "." || *piece == ".." {
                return Err(format!(
                    "route template {template:?}: literal segment {piece:?} is a dot segment"
                ));
            } else if !piece.bytes().all(is_param_byte) {
                return Err(format!(
                    "route template {template:?}: literal segment {piece:?} has characters outside [A-Za-z0-9._~-]"
                ));
            } else {
                segments.push(Segment::Literal((*piece).into()));
            }
        }
        if names.is_empty() {
            return Err(format!(
                "route template {template:?} has no {{name}} placeholder"
            ));
        }
        Ok(RouteTemplate {
            source: template.into(),
            segments: segments.into(),
            param_names: names.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.param_names.iter().map(|name| &**name)
    }

    /// `path` is the raw request path exactly as received (no query string; NOT percent-decoded).
    pub fn classify(&self, path: &str, fold_case: bool) -> RouteMatch {
        if let Some(verdict) = self.classify_route_shaped(path, fold_case) {
            return verdict;
        }
        // Nothing any upstream rewrites is present, so the raw path is the only
        // reading and stage 1 already found it is not the route.
        if !may_be_rewritten(path) {
            return RouteMatch::NotRoute;
        }
        if self.some_reading_is_route(path.as_bytes()) {
            RouteMatch::Reject(PathRejection::non_canonical(describe_non_canonical(path)))
        } else {
            RouteMatch::NotRoute
        }
    }

    /// Stage 1: `None` unless the raw path has the template's shape; else its verdict, in one
    /// pass over the segments. A literal in the wrong case outranks every parameter problem,
    /// and every `ROMA.1007` problem outranks every `ROMA.13000` one, wherever it is.
    fn classify_route_shaped(&self, path: &str, fold_case: bool) -> Option<RouteMatch> {
        let rest = path.strip_prefix('/')?;
        let mut pieces = SlashSplit { rest: Some(rest) };
        let mut literal_case_differs = false;
        let mut non_canonical = None;
        let mut bad_parameter = None;
        let mut key = String::with_capacity(rest.len());
        let mut first_param_done = false;
        for segment in self.segments.iter() {
            let piece = pieces.next()?;
            let Segment::Literal(literal) = segment else {
                // The usual parameter is all parameter bytes: then only its shape and length
                // can be wrong, and the byte-by-byte reasons are looked for only when it is not.
                let (plain, upper) = piece.bytes().fold((true, false), |(plain, upper), b| {
                    (plain & is_param_byte(b), upper | b.is_ascii_uppercase())
                });
                if non_canonical.is_none() {
                    non_canonical = if plain {
                        dot_or_empty_problem(piece)
                    } else {
                        non_canonical_problem(piece)
                    };
                }
                if bad_parameter.is_none() && !(plain && piece.len() <= MAX_PARAM_LEN) {
                    bad_parameter = bad_parameter_problem(piece);
                }
                if first_param_done {
                    key.push('/');
                }
                first_param_done = true;
                let start = key.len();
                key.push_str(piece);
                if fold_case && upper {
                    key[start..].make_ascii_lowercase();
                }
                continue;
            };
            if piece != &**literal {
                if !piece.eq_ignore_ascii_case(literal) {
                    return None;
                }
                literal_case_differs = true;
            }
        }
        if pieces.next().is_some() {
            return None;
        }
        let verdict = if literal_case_differs {
            RouteMatch::Reject(PathRejection::non_canonical(reason::LITERAL_CASE))
        } else if let Some(problem) = non_canonical {
            RouteMatch::Reject(PathRejection::non_canonical(problem))
        } else if let Some(problem) = bad_parameter {
            RouteMatch::Reject(PathRejection {
                kind: RejectKind::BadParameter,
                reason: problem,
            })
        } else {
            RouteMatch::Archive(ArchiveKey {
                key: key.into(),
                param_names: Arc::clone(&self.param_names),
            })
        };
        Some(verdict)
    }

    /// Stage 2: breadth-first search over the readings a permissive upstream could make.
    fn some_reading_is_route(&self, path: &[u8]) -> bool {
        self.explore_readings(path).is_route
    }

    /// The search itself, with what it cost: at most `MAX_READINGS` readings of at most
    /// `MAX_READING_BYTES` in all (or the raw path alone, when longer), whatever the path; a
    /// test holds it to that.
    fn explore_readings(&self, path: &[u8]) -> Exploration {
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut queue: VecDeque<Vec<u8>> = VecDeque::new();
        let mut bytes_explored = path.len();
        let mut exhausted = false;
        seen.insert(path.to_vec());
        queue.push_back(path.to_vec());
        let explored = |is_route, seen: &HashSet<_>, bytes, exhausted| Exploration {
            is_route,
            readings: seen.len(),
            bytes,
            exhausted,
        };
        while let Some(reading) = queue.pop_front() {
            if self.reading_is_route(&reading) {
                return explored(true, &seen, bytes_explored, exhausted);
            }
            if exhausted {
                continue;
            }
            for rewrite in REWRITES {
                let Some(next) = rewrite(&reading) else {
                    continue;
                };
                if seen.contains(&next) {
                    continue;
                }
                if seen.len() >= MAX_READINGS || bytes_explored + next.len() > MAX_READING_BYTES {
                    exhausted = true;
                    break;
                }
                bytes_explored += next.len();
                seen.insert(next.clone());
                queue.push_back(next);
            }
        }
        // Unexplored readings remain: decide by a test that can only err towards rejecting.
        let is_route = exhausted && self.literals_appear_in_order(path);
        explored(is_route, &seen, bytes_explored, exhausted)
    }

    /// Whether one reading has the template's shape. Lenient on purpose: a
    /// missing leading slash, trailing slashes and empty parameters still count.
    fn reading_is_route(&self, reading: &[u8]) -> bool {
        let mut rest = reading.strip_prefix(b"/").unwrap_or(reading);
        while let Some(shorter) = rest.strip_suffix(b"/") {
            rest = shorter;
        }
        let mut pieces = rest.split(|&b| b == b'/');
        for segment in self.segments.iter() {
            let Some(piece) = pieces.next() else {
                return false;
            };
            if let Segment::Literal(literal) = segment {
                if !folds_to_literal(piece, literal) {
                    return false;
                }
            }
        }
        pieces.next().is_none()
    }

    /// Coarse fallback: after decoding everything, do the literals occur in
    /// order (ignoring case)? Every reading that matches the template spells
    /// them out, and further decoding cannot break a literal (no escape can
    /// straddle the '/' around it), so answering `false` here misses no route.
    /// A path still changing after the last round cannot be judged: route.
    fn literals_appear_in_order(&self, path: &[u8]) -> bool {
        let mut text = path.to_vec();
        let mut settled = false;
        for _ in 0..MAX_FALLBACK_ROUNDS {
            let mut changed = false;
            for rewrite in [
                percent_decode_all as Rewrite,
                map_compatibility_forms,
                strip_whitespace,
            ] {
                if let Some(next) = rewrite(&text) {
                    text = next;
                    changed = true;
                }
            }
            if !changed {
                settled = true;
                break;
            }
        }
        if !settled {
            return true;
        }
        let folded = fold_for_search(&text);
        let mut haystack = folded.as_slice();
        for segment in self.segments.iter() {
            if let Segment::Literal(literal) = segment {
                let needle = literal.to_ascii_lowercase();
                match find(haystack, needle.as_bytes()) {
                    Some(at) => haystack = &haystack[at + needle.len()..],
                    None => return false,
                }
            }
        }
        true
    }
}

/// What one stage-2 search found, and how far it went (the counts are read by tests only).
#[cfg_attr(not(test), allow(dead_code))]
struct Exploration {
    is_route: bool,
    /// Distinct readings held, the raw path included.
    readings: usize,
    /// Their bytes in all.
    bytes: usize,
    /// Whether a bound stopped the search, leaving the verdict to the coarse fallback.
    exhausted: bool,
}

/// `str::split('/')` for the route check's short segments, byte by byte: `split('/')` sets up
/// a `memchr` searcher per segment (7 per archive path) and a `char` closure decodes UTF-8.
struct SlashSplit<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for SlashSplit<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let rest = self.rest?;
        match rest.bytes().position(|b| b == b'/') {
            Some(at) => {
                self.rest = rest.get(at + 1..);
                rest.get(..at)
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// The verdict on one request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    /// Not the archive route under any reading: forward unchanged.
    NotRoute,
    /// Exactly canonical: the archive key.
    Archive(ArchiveKey),
    /// The route, but not acceptable.
    Reject(PathRejection),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    /// ROMA.1007: the path is not in canonical form.
    NonCanonical,
    /// ROMA.13000: a path parameter is too long or has characters outside `[A-Za-z0-9._~-]`.
    BadParameter,
}

/// Why a path on the archive route was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRejection {
    pub kind: RejectKind,
    pub reason: &'static str,
}

impl PathRejection {
    fn non_canonical(reason: &'static str) -> Self {
        PathRejection {
            kind: RejectKind::NonCanonical,
            reason,
        }
    }
}

/// The identity of an archive: its captured parameters, folded when `fold_case`.
///
/// Equality and hashing use the key string only: the parameter names belong
/// to the template, and the ledger identifies archives by the string.
#[derive(Debug, Clone)]
pub struct ArchiveKey {
    /// Shared by the layers and the log event of one request instead of copied.
    key: Arc<str>,
    param_names: Arc<[Box<str>]>,
}

impl PartialEq for ArchiveKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for ArchiveKey {}

impl Hash for ArchiveKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl ArchiveKey {
    /// The key as one string: the (folded when fold_case) params joined with '/', e.g. "p1/i1/a1".
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The key string, shared.
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.key)
    }

    /// A captured param by template name, as folded in the key (e.g. "project_id").
    pub fn param(&self, name: &str) -> Option<&str> {
        let index = self.param_names.iter().position(|known| &**known == name)?;
        self.key.split('/').nth(index)
    }

    /// Rebuilds a key from its string form (used when reading stored records back).
    /// None if it has the wrong number of parts, or a part that is not a valid parameter.
    /// The string is taken as stored: it is not folded again.
    pub fn from_key_string(template: &RouteTemplate, key: &str) -> Option<ArchiveKey> {
        let mut parts = 0;
        for part in key.split('/') {
            if part.is_empty() || bad_parameter_problem(part).is_some() {
                return None;
            }
            parts += 1;
        }
        (parts == template.param_names.len()).then(|| ArchiveKey {
            key: key.into(),
            param_names: Arc::clone(&template.param_names),
        })
    }
}

/// For a path starting with "/v2/{project_id}/..." (the ROMA API's project prefix, case-insensitive "v2"),
/// the raw project_id segment; None otherwise. Used by the auth layer on non-archive paths.
///
/// The segment must be followed by '/'. It is returned raw, even when empty or
/// encoded, so that a project check on an odd path fails instead of being skipped.
pub fn v2_project_segment(path: &str) -> Option<&str> {
    let prefix = path.get(..4)?;
    if !prefix.eq_ignore_ascii_case("/v2/") {
        return None;
    }
    let rest = path.get(4..)?;
    let end = rest.find('/')?;
    rest.get(..end)
}

fn is_param_byte(byte: u8) -> bool {
    PARAM_BYTES[usize::from(byte)]
}

/// `[A-Za-z0-9._~-]` as a table: one load per byte of every parameter the route check reads.
const PARAM_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = matches!(byte as u8, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'~' | b'-');
        byte += 1;
    }
    table
};

fn is_placeholder_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// The ROMA.1007 problem a single byte causes, if any. `#` and `?` are
/// included: inside a path they can only mean the request was mangled, and an
/// upstream may cut the path there.
const fn byte_problem(byte: u8) -> Option<&'static str> {
    match byte {
        b'%' => Some(reason::PERCENT),
        b';' => Some(reason::SEMICOLON),
        b'\\' => Some(reason::BACKSLASH),
        b'#' | b'?' => Some(reason::DELIMITER),
        0x00..=0x1f | 0x7f => Some(reason::CONTROL),
        0x80..=0xff => Some(reason::NON_ASCII),
        _ => None,
    }
}

/// The ROMA.1007 problem of one parameter segment of a route-shaped path.
fn non_canonical_problem(param: &str) -> Option<&'static str> {
    dot_or_empty_problem(param).or_else(|| param.bytes().find_map(byte_problem))
}

fn dot_or_empty_problem(param: &str) -> Option<&'static str> {
    match param {
        "" => Some(reason::EMPTY_SEGMENT),
        "." | ".." => Some(reason::DOT_SEGMENT),
        _ => None,
    }
}

/// The ROMA.13000 problem of one parameter, if any.
fn bad_parameter_problem(param: &str) -> Option<&'static str> {
    if param.len() > MAX_PARAM_LEN {
        Some(reason::TOO_LONG)
    } else if !param.bytes().all(is_param_byte) {
        Some(reason::BAD_CHARACTER)
    } else {
        None
    }
}

/// Whether any rewrite in [`REWRITES`] could change this path. Space counts
/// because leading and trailing blanks are trimmed by WHATWG-style parsers.
fn may_be_rewritten(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return true;
    };
    let mut segments = SlashSplit { rest: Some(rest) };
    segments.any(|segment| {
        matches!(segment, "" | "." | "..") || segment.bytes().any(|b| REWRITABLE[usize::from(b)])
    })
}

/// The bytes some rewrite acts on: those [`byte_problem`] names, and space.
const REWRITABLE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = byte == b' ' as usize || byte_problem(byte as u8).is_some();
        byte += 1;
    }
    table
};

/// A short reason for rejecting a path that only some reading made the route.
fn describe_non_canonical(path: &str) -> &'static str {
    if let Some(problem) = path.bytes().find_map(byte_problem) {
        return problem;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return reason::NOT_ORIGIN_FORM;
    };
    if path.contains("//") {
        reason::EMPTY_SEGMENT
    } else if path.ends_with('/') {
        reason::TRAILING_SLASH
    } else if rest.split('/').any(|s| s == "." || s == "..") {
        reason::DOT_SEGMENT
    } else {
        reason::NOT_CANONICAL
    }
}

// ---------------------------------------------------------------------------
// Rewrites a permissive upstream may apply. Each returns `None` when it would
// not change the input, so the search only ever grows on real differences.
// ---------------------------------------------------------------------------

type Rewrite = fn(&[u8]) -> Option<Vec<u8>>;

const REWRITES: [Rewrite; 13] = [
    percent_decode_all,
    percent_decode_keeping_separators,
    backslash_to_slash,
    drop_segment_params,
    merge_slashes,
    remove_dot_segments,
    cut_at_fragment,
    cut_at_query,
    cut_at_semicolon,
    cut_at_nul,
    map_compatibility_forms,
    strip_whitespace,
    strip_scheme_and_authority,
];

/// One round of percent-decoding, including IIS-style `%uXXXX`. Invalid escapes stay as they are.
fn percent_decode_all(path: &[u8]) -> Option<Vec<u8>> {
    percent_decode(path, false)
}

/// Like [`percent_decode_all`] but leaves `%2F` and `%5C` encoded, as servers
/// that refuse to decode separators (e.g. Apache's `AllowEncodedSlashes NoDecode`) do.
fn percent_decode_keeping_separators(path: &[u8]) -> Option<Vec<u8>> {
    percent_decode(path, true)
}

fn percent_decode(path: &[u8], keep_separators: bool) -> Option<Vec<u8>> {
    if !path.contains(&b'%') {
        return None;
    }
    let mut out = Vec::with_capacity(path.len());
    let mut changed = false;
    let mut index = 0;
    while let Some(&byte) = path.get(index) {
        if byte == b'%' {
            if let Some((decoded, consumed)) = decode_escape(&path[index..]) {
                let is_separator = matches!(decoded, Decoded::Byte(b'/' | b'\\'))
                    || matches!(decoded, Decoded::Char('/' | '\\'));
                if !(keep_separators && is_separator) {
                    match decoded {
                        Decoded::Byte(b) => out.push(b),
                        Decoded::Char(c) => {
                            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes())
                        }
                    }
                    index += consumed;
                    changed = true;
                    continue;
                }
            }
        }
        out.push(byte);
        index += 1;
    }
    changed.then_some(out)
}

enum Decoded {
    Byte(u8),
    Char(char),
}

/// Decodes the escape at the start of `bytes` (which starts with '%'): the value and the bytes consumed.
fn decode_escape(bytes: &[u8]) -> Option<(Decoded, usize)> {
    let high = bytes.get(1).copied().and_then(hex_value);
    let low = bytes.get(2).copied().and_then(hex_value);
    if let (Some(high), Some(low)) = (high, low) {
        return Some((Decoded::Byte(high << 4 | low), 3));
    }
    if matches!(bytes.get(1), Some(b'u' | b'U')) {
        let digits = bytes.get(2..6)?;
        let value = digits.iter().try_fold(0u32, |acc, &b| {
            hex_value(b).map(|digit| acc << 4 | u32::from(digit))
        })?;
        return Some((Decoded::Char(char::from_u32(value)?), 6));
    }
    None
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

fn backslash_to_slash(path: &[u8]) -> Option<Vec<u8>> {
    path.contains(&b'\\').then(|| {
        path.iter()
            .map(|&b| if b == b'\\' { b'/' } else { b })
            .collect()
    })
}

/// Drops `;params` from every segment (`seg;x=y` becomes `seg`), as servlet containers do.
fn drop_segment_params(path: &[u8]) -> Option<Vec<u8>> {
    if !path.contains(&b';') {
        return None;
    }
    let mut out = Vec::with_capacity(path.len());
    for (index, segment) in path.split(|&b| b == b'/').enumerate() {
        if index > 0 {
            out.push(b'/');
        }
        let end = segment
            .iter()
            .position(|&b| b == b';')
            .unwrap_or(segment.len());
        out.extend_from_slice(&segment[..end]);
    }
    Some(out)
}

fn merge_slashes(path: &[u8]) -> Option<Vec<u8>> {
    if !path.windows(2).any(|pair| pair == b"//") {
        return None;
    }
    let mut out = Vec::with_capacity(path.len());
    for &byte in path {
        if !(byte == b'/' && out.last() == Some(&b'/')) {
            out.push(byte);
        }
    }
    Some(out)
}

/// RFC 3986 §5.2.4 on whole segments; `..` above the root is dropped.
fn remove_dot_segments(path: &[u8]) -> Option<Vec<u8>> {
    let absolute = path.first() == Some(&b'/');
    let body = path.strip_prefix(b"/").unwrap_or(path);
    let is_dot = |segment: &[u8]| segment == b"." || segment == b"..";
    if !body.split(|&b| b == b'/').any(is_dot) {
        return None;
    }
    let pieces: Vec<&[u8]> = body.split(|&b| b == b'/').collect();
    let mut kept: Vec<&[u8]> = Vec::with_capacity(pieces.len());
    for (index, &piece) in pieces.iter().enumerate() {
        match piece {
            b"." => {}
            b".." => {
                kept.pop();
            }
            other => kept.push(other),
        }
        // A final dot segment leaves the directory it names, with its slash.
        if index + 1 == pieces.len() && is_dot(piece) {
            kept.push(b"");
        }
    }
    let mut out = Vec::with_capacity(path.len());
    if absolute {
        out.push(b'/');
    }
    out.extend_from_slice(&kept.join(&b'/'));
    Some(out)
}

/// Keeps what precedes the first `delimiter`, as an upstream that splits there (again) would.
fn cut_at(path: &[u8], delimiter: u8) -> Option<Vec<u8>> {
    let end = path.iter().position(|&b| b == delimiter)?;
    Some(path[..end].to_vec())
}

fn cut_at_fragment(path: &[u8]) -> Option<Vec<u8>> {
    cut_at(path, b'#')
}

fn cut_at_query(path: &[u8]) -> Option<Vec<u8>> {
    cut_at(path, b'?')
}

/// Some frameworks drop everything from the first `;` on, not just per segment.
fn cut_at_semicolon(path: &[u8]) -> Option<Vec<u8>> {
    cut_at(path, b';')
}

/// C-string handling ends the path at NUL.
fn cut_at_nul(path: &[u8]) -> Option<Vec<u8>> {
    cut_at(path, 0)
}

/// Maps characters that NFKC normalization, "best fit" code pages or lenient
/// UTF-8 decoders turn into ASCII: fullwidth forms (`／`, `．`, `ａ`), small
/// and other lookalike punctuation, and overlong encodings (`%C0%AF`).
fn map_compatibility_forms(path: &[u8]) -> Option<Vec<u8>> {
    if path.is_ascii() {
        return None;
    }
    let mut out = Vec::with_capacity(path.len());
    let mut changed = false;
    let mut index = 0;
    while index < path.len() {
        let (code_point, len) = decode_char_lenient(&path[index..]);
        match compatibility_ascii(code_point, len) {
            Some(ascii) => {
                out.push(ascii);
                changed = true;
            }
            None => out.extend_from_slice(&path[index..index + len]),
        }
        index += len;
    }
    changed.then_some(out)
}

fn compatibility_ascii(code_point: u32, encoded_len: usize) -> Option<u8> {
    let ascii = match code_point {
        0x00..=0x7f if encoded_len > 1 => code_point,
        0xff01..=0xff5e => code_point - 0xfee0,
        0x2024 | 0xfe52 => u32::from(b'.'),
        0x2044 | 0x2215 => u32::from(b'/'),
        0x2216 | 0xfe68 => u32::from(b'\\'),
        0xfe54 => u32::from(b';'),
        0xfe6a => u32::from(b'%'),
        _ => return None,
    };
    u8::try_from(ascii).ok()
}

/// WHATWG URL parsing removes tabs and newlines anywhere and trims C0 controls and spaces at both ends.
fn strip_whitespace(path: &[u8]) -> Option<Vec<u8>> {
    let start = path.iter().position(|&b| b > b' ').unwrap_or(path.len());
    let end = path
        .iter()
        .rposition(|&b| b > b' ')
        .map_or(start, |last| last + 1);
    let out: Vec<u8> = path[start..end]
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\t' | b'\n' | b'\r'))
        .collect();
    (out.len() != path.len()).then_some(out)
}

/// An absolute-form target (`http://host/v2/...`) or a network-path reference
/// (`//host/v2/...`) is read by some URL parsers as an authority plus a path.
fn strip_scheme_and_authority(path: &[u8]) -> Option<Vec<u8>> {
    let after_scheme = match path.iter().position(|&b| b == b':') {
        Some(colon) if is_scheme(&path[..colon]) => &path[colon + 1..],
        _ => path,
    };
    let authority_and_path = after_scheme.strip_prefix(b"//")?;
    let path_start = authority_and_path
        .iter()
        .position(|&b| b == b'/')
        .unwrap_or(authority_and_path.len());
    let rest = &authority_and_path[path_start..];
    Some(if rest.is_empty() {
        b"/".to_vec()
    } else {
        rest.to_vec()
    })
}

fn is_scheme(candidate: &[u8]) -> bool {
    match candidate.split_first() {
        Some((first, rest)) => {
            first.is_ascii_alphabetic()
                && rest
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
        }
        None => false,
    }
}

// ---------------------------------------------------------------------------
// Character-level helpers for readings, which may hold any bytes.
// ---------------------------------------------------------------------------

/// Decodes one UTF-8 sequence at the start of `bytes`, accepting overlong
/// forms on purpose (lenient decoders do, which is the trick guarded against).
/// A byte that starts no valid sequence comes back as [`INVALID_CHAR`] of length 1.
/// The length is always at least 1 and never past the end of `bytes`.
fn decode_char_lenient(bytes: &[u8]) -> (u32, usize) {
    let Some(&lead) = bytes.first() else {
        return (INVALID_CHAR, 1);
    };
    let (continuations, mut code_point) = match lead {
        0x00..=0x7f => return (u32::from(lead), 1),
        0xc0..=0xdf => (1, u32::from(lead & 0x1f)),
        0xe0..=0xef => (2, u32::from(lead & 0x0f)),
        0xf0..=0xf7 => (3, u32::from(lead & 0x07)),
        _ => return (INVALID_CHAR, 1),
    };
    for offset in 1..=continuations {
        match bytes.get(offset) {
            Some(&b) if b & 0xc0 == 0x80 => code_point = code_point << 6 | u32::from(b & 0x3f),
            _ => return (INVALID_CHAR, 1),
        }
    }
    (code_point, continuations + 1)
}

/// The lowercase ASCII letter a case-insensitive comparison could equate this
/// character with. Besides ASCII, Unicode case mapping sends `ı`, `İ`, `ſ` and
/// the Kelvin sign onto ASCII letters (Java's `equalsIgnoreCase` does).
fn case_fold_to_ascii(code_point: u32) -> Option<u8> {
    match code_point {
        0x00..=0x7f => u8::try_from(code_point)
            .ok()
            .map(|b| b.to_ascii_lowercase()),
        0x130 | 0x131 => Some(b'i'),
        0x17f => Some(b's'),
        0x212a => Some(b'k'),
        _ => None,
    }
}

fn folds_to_literal(piece: &[u8], literal: &str) -> bool {
    let mut expected = literal.bytes();
    let mut index = 0;
    while index < piece.len() {
        let (code_point, len) = decode_char_lenient(&piece[index..]);
        index += len;
        match (expected.next(), case_fold_to_ascii(code_point)) {
            (Some(want), Some(got)) if want.to_ascii_lowercase() == got => {}
            _ => return false,
        }
    }
    expected.next().is_none()
}

/// Case-folds a reading for substring search; characters with no ASCII fold become 0xFF, which matches no literal.
fn fold_for_search(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut index = 0;
    while index < text.len() {
        let (code_point, len) = decode_char_lenient(&text[index..]);
        out.push(case_fold_to_ascii(code_point).unwrap_or(0xff));
        index += len;
    }
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len().max(1))
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "/v2/{project_id}/instances/{instance_id}/assets/archives/{archive_id}";

    #[derive(Debug, Clone, Copy)]
    enum Expect<'a> {
        Key(&'a str),
        NonCanonical,
        BadParameter,
        NotRoute,
    }
    use Expect::{BadParameter, Key, NonCanonical, NotRoute};

    fn default_template() -> RouteTemplate {
        RouteTemplate::parse(DEFAULT).expect("default template parses")
    }

    fn check(template: &RouteTemplate, path: &str, fold_case: bool, expect: Expect<'_>) {
        let got = template.classify(path, fold_case);
        let ok = match (&got, expect) {
            (RouteMatch::Archive(key), Key(want)) => key.as_str() == want,
            (RouteMatch::Reject(r), NonCanonical) => r.kind == RejectKind::NonCanonical,
            (RouteMatch::Reject(r), BadParameter) => r.kind == RejectKind::BadParameter,
            (RouteMatch::NotRoute, NotRoute) => true,
            _ => false,
        };
        assert!(
            ok,
            "path {path:?} (fold_case={fold_case}): expected {expect:?}, got {got:?}"
        );
    }

    #[test]
    fn slash_split_splits_as_str_split_does() {
        for text in [
            "",
            "/",
            "//",
            "a",
            "a/",
            "/a",
            "a//b",
            "v2/p/instances/é/x/",
            "a/b/c",
        ] {
            let ours: Vec<&str> = SlashSplit { rest: Some(text) }.collect();
            let std: Vec<&str> = text.split('/').collect();
            assert_eq!(ours, std, "{text:?}");
        }
    }

    #[test]
    fn the_parameter_byte_table_is_the_unreserved_set() {
        for byte in 0..=255u8 {
            let unreserved =
                byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'~' | b'-');
            assert_eq!(is_param_byte(byte), unreserved, "{byte:#x}");
        }
    }

    #[test]
    fn classifies_tricky_paths() {
        let long64 = "a".repeat(64);
        let long65 = "a".repeat(65);
        let ok64 = format!("/v2/p/instances/i/assets/archives/{long64}");
        let bad65 = format!("/v2/p/instances/i/assets/archives/{long65}");
        let key64 = format!("p/i/{long64}");
        let bad65_project = format!("/v2/{long65}/instances/i/assets/archives/a");
        let cases: Vec<(&str, bool, Expect)> = vec![
            // Canonical.
            ("/v2/p1/instances/i1/assets/archives/a1", true, Key("p1/i1/a1")),
            ("/v2/p1/instances/i1/assets/archives/a1", false, Key("p1/i1/a1")),
            ("/v2/p/instances/i/assets/archives/a.b-c_d~e", true, Key("p/i/a.b-c_d~e")),
            ("/v2/p/instances/i/assets/archives/...", true, Key("p/i/...")),
            // Case of parameter values: folded only with fold_case.
            ("/v2/Proj-1/instances/Inst_2/assets/archives/Arch.3", true, Key("proj-1/inst_2/arch.3")),
            ("/v2/Proj-1/instances/Inst_2/assets/archives/Arch.3", false, Key("Proj-1/Inst_2/Arch.3")),
            ("/v2/P/instances/I/assets/archives/A", true, Key("p/i/a")),
            // Encoded slashes and backslashes.
            ("/v2/p/instances/i/assets/archives/a%2Fb", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%2fb", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%5Cb", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives%2Fa", true, NonCanonical),
            ("/v2/p/instances/i/assets%2farchives%2fa", false, NonCanonical),
            ("/v2/p/instances/i/assets%5Carchives%5ca", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives%u002Fa", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives%c0%afa", true, NonCanonical),
            // Encoded dots and double encoding.
            ("/v2/p/instances/i/assets/archives/%2e%2e", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/%2E%2E/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/.%2e/a", false, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/..%2Fa", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives%252Fa", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/%252e%252e/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/%25252e%25252E/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x%2F../../a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%2Fb/c/%2e%2e", true, NonCanonical),
            // Percent signs of any kind in a parameter.
            ("/v2/p/instances/i/assets/archives/a%41", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/%", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/%zz", true, NonCanonical),
            ("/v2/%70/instances/i/assets/archives/a", true, NonCanonical),
            ("/%76%32/p/instances/i/assets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%3Fx", true, NonCanonical),
            // Dot segments.
            ("/v2/p/instances/i/assets/./archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/../a", true, NonCanonical),
            ("/v2/p/instances/i/x/../assets/archives/a", true, NonCanonical),
            ("/v2/../v2/p/instances/i/assets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a/b/..", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/.", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/..", true, NonCanonical),
            ("/v2/./instances/i/assets/archives/a", true, NonCanonical),
            // Traversal that leads elsewhere is not the route.
            ("/v2/p/instances/i/assets/archives/a/..", true, NotRoute),
            ("/v2/p/instances/i/assets/archives/a/../../../other", true, NotRoute),
            ("/docs/./index.html", true, NotRoute),
            // Empty segments and trailing slashes.
            ("/v2//instances/i/assets/archives/a", true, NonCanonical),
            ("/v2/p/instances//assets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/", true, NonCanonical),
            ("//v2/p/instances/i/assets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets//archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a/", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a//", false, NonCanonical),
            // `;` parameters.
            ("/v2/p/instances/i/assets/archives/a;jsessionid=X", true, NonCanonical),
            ("/v2/p/instances/i/assets;x=1/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/..;/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a;/x", true, NonCanonical),
            // Backslashes.
            ("/v2/p/instances/i/assets/archives/a\\b", true, NonCanonical),
            ("/v2/p/instances/i/assets\\archives\\a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x\\..\\a", true, NonCanonical),
            // Control and non-ASCII bytes.
            ("/v2/p/instances/i/assets/archives/a\tb", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a\0", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a\x7f", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a\n", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/caf\u{e9}", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a/%09", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%00/x", true, NonCanonical),
            ("/v2/p/instances/i/assets/archi\tves/a", true, NonCanonical),
            // Unicode lookalikes of the literals and separators.
            ("/v2/p/instances/i/assets/arch\u{131}ves/a", true, NonCanonical),
            ("/v2/p/instances/i/a\u{17f}\u{17f}ets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives\u{ff0f}a", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/x/\u{ff0e}\u{ff0e}/a", true, NonCanonical),
            // Case variants of literal parts.
            ("/V2/p/instances/i/assets/archives/a", true, NonCanonical),
            ("/v2/p/instances/i/assets/ARCHIVES/a", true, NonCanonical),
            ("/v2/p/instances/i/Assets/archives/a", false, NonCanonical),
            ("/V2/P/INSTANCES/I/ASSETS/ARCHIVES/A", true, NonCanonical),
            // Length limit.
            (ok64.as_str(), true, Key(key64.as_str())),
            (bad65.as_str(), true, BadParameter),
            (bad65_project.as_str(), false, BadParameter),
            // Characters outside the parameter alphabet.
            ("/v2/p/instances/i/assets/archives/a$b", true, BadParameter),
            ("/v2/p/instances/i/assets/archives/a@b", true, BadParameter),
            ("/v2/p/instances/i/assets/archives/a b", true, BadParameter),
            ("/v2/p/instances/i/assets/archives/a+b", true, BadParameter),
            ("/v2/p/instances/i/assets/archives/a!b", true, BadParameter),
            ("/v2/p/instances/i/assets/archives/a*b", false, BadParameter),
            ("/v2/p!/instances/i/assets/archives/a", true, BadParameter),
            // 1007 outranks 13000 wherever it appears.
            ("/v2/p$/instances/i/assets/archives/a%41", true, NonCanonical),
            (
                "/V2/p/instances/i/assets/archives/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                true,
                NonCanonical,
            ),
            // Fragments never yield a different key.
            ("/v2/p/instances/i/assets/archives/a#frag", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a#/../../x", true, NonCanonical),
            ("/v2/p/instances/i/assets/archives/a%23/x", true, NonCanonical),
            // Absolute-form and network-path references.
            ("http://host/v2/p/instances/i/assets/archives/a", true, NonCanonical),
            ("//evil.example/v2/p/instances/i/assets/archives/a", true, NonCanonical),
            // Not the route.
            ("/v2/p/instances/i/assets/archives", true, NotRoute),
            ("/v2/p/instances/i/assets/archives/a/extra", true, NotRoute),
            ("/v3/p/instances/i/assets/archives/a", true, NotRoute),
            ("/v2/p/instances/i/other/a", true, NotRoute),
            ("/v2/p/instances/i/assets/other%2Fx", true, NotRoute),
            ("/v2/p/instances/i/assets/archives-list/a", true, NotRoute),
            ("/static/a%20b.png", true, NotRoute),
            ("/", true, NotRoute),
            ("", true, NotRoute),
            ("*", true, NotRoute),
        ];
        assert!(cases.len() >= 50, "only {} cases", cases.len());
        let template = default_template();
        for (path, fold_case, expect) in cases {
            check(&template, path, fold_case, expect);
        }
    }

    #[test]
    fn rejection_reasons_name_the_problem() {
        let template = default_template();
        let reason_of = |path: &str| match template.classify(path, true) {
            RouteMatch::Reject(rejection) => rejection.reason,
            other => panic!("{path:?} not rejected: {other:?}"),
        };
        assert_eq!(
            reason_of("/v2/p/instances/i/assets/archives/a%2F"),
            reason::PERCENT
        );
        assert_eq!(
            reason_of("/v2//instances/i/assets/archives/a"),
            reason::EMPTY_SEGMENT
        );
        assert_eq!(
            reason_of("/v2/p/instances/i/assets/archives/a/"),
            reason::TRAILING_SLASH
        );
        assert_eq!(
            reason_of("/v2/p/instances/i/assets/x/../archives/a"),
            reason::DOT_SEGMENT
        );
        assert_eq!(
            reason_of("/v2/p/instances/i/ASSETS/archives/a"),
            reason::LITERAL_CASE
        );
        let long = format!("/v2/p/instances/i/assets/archives/{}", "b".repeat(65));
        assert_eq!(reason_of(&long), reason::TOO_LONG);
        assert_eq!(
            reason_of("/v2/p/instances/i/assets/archives/a@b"),
            reason::BAD_CHARACTER
        );
    }

    #[test]
    fn custom_template() {
        let template = RouteTemplate::parse("/files/{file_id}").expect("parses");
        assert_eq!(template.as_str(), "/files/{file_id}");
        assert_eq!(template.param_names().collect::<Vec<_>>(), ["file_id"]);
        check(&template, "/files/ABC", true, Key("abc"));
        check(&template, "/files/ABC", false, Key("ABC"));
        check(&template, "/FILES/abc", true, NonCanonical);
        check(&template, "/files/abc/", true, NonCanonical);
        check(&template, "/files/a%2e", true, NonCanonical);
        check(&template, "/files/x/../abc", true, NonCanonical);
        check(&template, "/files/", true, NonCanonical);
        check(&template, "/files", true, NotRoute);
        check(&template, "/files/a/b", true, NotRoute);
        check(&template, "/other/abc", true, NotRoute);
        check(
            &template,
            "/v2/p/instances/i/assets/archives/a",
            true,
            NotRoute,
        );
    }

    #[test]
    fn template_parse_errors() {
        for bad in [
            "",
            "/",
            "v2/{a}",
            "/v2//{a}",
            "/v2/{a}/",
            "/v2/x{a}",
            "/v2/{a}x",
            "/v2/{a}}",
            "/v2/{{a}",
            "/{}",
            "/v2/{A}",
            "/v2/{1a}",
            "/v2/{a-b}",
            "/v2/{a}/{a}",
            "/v2/x",
            "/v2/a b/{a}",
            "/v2/a%2F/{a}",
            "/v2/./{a}",
            "/v2/../{a}",
        ] {
            assert!(
                RouteTemplate::parse(bad).is_err(),
                "{bad:?} should not parse"
            );
        }
        let trailing = RouteTemplate::parse("/v2/{a}/").expect_err("trailing slash");
        assert!(trailing.contains("end with '/'"), "{trailing}");
        let template = RouteTemplate::parse("/{_a}/x.y~z-0/{b_1}").expect("parses");
        assert_eq!(template.param_names().collect::<Vec<_>>(), ["_a", "b_1"]);
        assert!(RouteTemplate::parse(DEFAULT).is_ok());
    }

    #[test]
    fn archive_key_params_and_round_trip() {
        let template = default_template();
        let RouteMatch::Archive(key) =
            template.classify("/v2/Proj/instances/Inst/assets/archives/Arc", true)
        else {
            panic!("expected an archive");
        };
        assert_eq!(key.as_str(), "proj/inst/arc");
        assert_eq!(key.param("project_id"), Some("proj"));
        assert_eq!(key.param("instance_id"), Some("inst"));
        assert_eq!(key.param("archive_id"), Some("arc"));
        assert_eq!(key.param("nope"), None);

        let rebuilt = ArchiveKey::from_key_string(&template, key.as_str()).expect("rebuilds");
        assert_eq!(rebuilt, key);
        assert_eq!(rebuilt.param("archive_id"), Some("arc"));
        let kept = ArchiveKey::from_key_string(&template, "P/I/A").expect("kept as stored");
        assert_eq!(kept.as_str(), "P/I/A");

        for bad in ["", "p/i", "p/i/a/x", "p//a", "p/i/a/", "p/i/a b", "p/i/%41"] {
            assert!(
                ArchiveKey::from_key_string(&template, bad).is_none(),
                "{bad:?} should not rebuild"
            );
        }
        let long = format!("p/i/{}", "x".repeat(65));
        assert!(ArchiveKey::from_key_string(&template, &long).is_none());
    }

    #[test]
    fn v2_project_segments() {
        assert_eq!(v2_project_segment("/v2/proj/anything"), Some("proj"));
        assert_eq!(v2_project_segment("/V2/Proj/x/y"), Some("Proj"));
        assert_eq!(v2_project_segment("/v2/p%41/x"), Some("p%41"));
        assert_eq!(v2_project_segment("/v2//x"), Some(""));
        assert_eq!(v2_project_segment("/v2/proj"), None);
        assert_eq!(v2_project_segment("/v2/"), None);
        assert_eq!(v2_project_segment("/v2"), None);
        assert_eq!(v2_project_segment("/v3/proj/x"), None);
        assert_eq!(v2_project_segment("/v20/proj/x"), None);
        assert_eq!(v2_project_segment("v2/proj/x"), None);
        assert_eq!(v2_project_segment("/\u{e9}2/proj/x"), None);
        assert_eq!(v2_project_segment(""), None);
    }

    /// Rebuilds the canonical path of a key from the template text.
    fn canonical_path(template: &RouteTemplate, key: &ArchiveKey) -> String {
        template
            .as_str()
            .split('/')
            .map(
                |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => key.param(name).expect("param of the key"),
                    None => segment,
                },
            )
            .collect::<Vec<_>>()
            .join("/")
    }

    #[test]
    fn any_byte_anywhere_never_panics_nor_aliases() {
        let template = default_template();
        let canonical = "/v2/p1/instances/i1/assets/archives/a1";
        let mut inserts: Vec<String> = (0u8..=127).map(|b| char::from(b).to_string()).collect();
        inserts.extend(
            [
                "\u{e9}",
                "\u{131}",
                "\u{ff0f}",
                "\u{2215}",
                "\u{10348}",
                "%2F",
                "%2e",
                "%u002f",
            ]
            .map(String::from),
        );
        let boundaries: Vec<usize> = (0..=canonical.len()).collect();
        for insert in &inserts {
            for &at in &boundaries {
                let inserted = format!("{}{}{}", &canonical[..at], insert, &canonical[at..]);
                let replaced = if at < canonical.len() {
                    format!("{}{}{}", &canonical[..at], insert, &canonical[at + 1..])
                } else {
                    inserted.clone()
                };
                for path in [inserted, replaced] {
                    for fold_case in [true, false] {
                        let verdict = template.classify(&path, fold_case);
                        if let RouteMatch::Archive(key) = &verdict {
                            assert!(
                                path.bytes()
                                    .all(|b| b.is_ascii_graphic()
                                        && !matches!(b, b'%' | b'\\' | b';'))
                                    && !path.contains("//"),
                                "{path:?} gave {verdict:?}"
                            );
                            let again =
                                template.classify(&canonical_path(&template, key), fold_case);
                            assert_eq!(again, verdict, "{path:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_paths_stay_cheap_and_err_towards_rejecting() {
        let template = default_template();
        // Enough stacked tricks to exhaust the search: the fallback decides by
        // whether the literals are still spelled out in order.
        let tricks_on_route =
            "/v2/p;x/instances/%2e/i\\assets/.//%252e%2F..;/archives/#?\t\u{ff0f}a%00";
        let tricks_elsewhere = "/x;a/%2e/b\\c/.//%252e%2F..;/d/#?\t\u{ff0f}e%00/f";
        check(&template, tricks_on_route, true, NonCanonical);
        check(&template, tricks_elsewhere, true, NotRoute);
        for path in [tricks_on_route, tricks_elsewhere] {
            assert!(
                template.explore_readings(path.as_bytes()).exhausted,
                "{path}"
            );
        }
        // Encoded forty times over, still found.
        let deep = format!("/v2/p/instances/i/assets/archives%{}2Fa", "25".repeat(40));
        check(&template, &deep, true, NonCanonical);
        // The search's work is bounded whatever the path (no timing: the bounds themselves).
        let long_mixed = tricks_on_route.repeat(100);
        let long_escapes = format!("/{}", "%25".repeat(3000));
        let long_plain = format!("/{}", "x/".repeat(4000));
        for path in [
            tricks_on_route,
            tricks_elsewhere,
            &deep,
            &long_mixed,
            &long_escapes,
            &long_plain,
        ] {
            let explored = template.explore_readings(path.as_bytes());
            assert!(
                explored.readings <= MAX_READINGS,
                "{} readings",
                explored.readings
            );
            assert!(
                explored.bytes <= MAX_READING_BYTES.max(path.len()),
                "{} bytes",
                explored.bytes
            );
            let _ = template.classify(path, true);
        }
    }
}
