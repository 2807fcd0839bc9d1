//! Request path normalisation, before routing and before the pod sees the path.
//!
//! Config validation normalises each route's `uri` with the same rules the proxy applies to
//! each request, so a route can only be written the way requests will be matched against it.
//! Both need it and neither owns it, hence its own module below both.

use std::borrow::Cow;

/// Why a request path is refused (answered `400`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `..` segment climbs above the root (`/a/../../etc`): there is no path it could mean.
    AboveRoot,
    /// A `.` or `..` hidden behind an encoded slash or backslash (`%2F`, `%5C`), a backslash, or
    /// a `;` parameter (`/p/..%2Fadmin`, `/p/..;/admin`). Per RFC 3986 `%2F` is data inside a
    /// segment, so lb-agent cannot resolve it, but servers that decode it first (or treat `\`
    /// as `/`, or strip `;` parameters, as Tomcat does) would climb out of the route.
    HiddenDotSegment,
}

impl PathError {
    pub fn reason(&self) -> &'static str {
        match self {
            PathError::AboveRoot => "the path climbs above the root",
            PathError::HiddenDotSegment => {
                "the path hides a dot-segment behind an encoded slash, a backslash or a ';'"
            }
        }
    }
}

/// Normalises a request path the way NGINX does before it picks a `location`: percent-encoded
/// unreserved characters are decoded (so `%2e` is `.`, RFC 3986 §6.2.2.2), duplicate slashes are
/// merged, and `.` and `..` segments are removed (RFC 3986 §5.2.4). A `..` above the root is an
/// error, as in NGINX, rather than RFC 3986's silent clamp: such a path is an attack or a bug.
///
/// The result is also what is forwarded to the pod, so the pod sees the path that was routed.
/// Other percent-encodings (`%2F`, `%20`, …) are data and stay as they are. A path that does not
/// start with `/` (`*` of `OPTIONS *`) is returned unchanged; it matches no route.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    // Whether the result ends with `/`: an empty last segment (`/a/`), or a dot-segment last
    // (`/a/b/..` is the directory `/a/`).
    let mut trailing_slash = false;
    for segment in decoded[1..].split('/') {
        trailing_slash = false;
        match segment {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            s if hides_dot_segment(s) => return Err(PathError::HiddenDotSegment),
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Decodes `%XX` where XX encodes an unreserved character (ALPHA, DIGIT, `-`, `.`, `_`, `~`);
/// these mean the same encoded or not (RFC 3986 §2.3), so routing must not tell them apart.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(c) = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|c| c.is_ascii_alphanumeric() || b"-._~".contains(c))
            {
                out.push(c as char);
                i += 3;
                continue;
            }
        }
        // `%` and everything else is ASCII or a whole UTF-8 sequence copied char by char.
        let ch = path[i..].chars().next().unwrap_or('%');
        out.push(ch);
        i += ch.len_utf8();
    }
    Cow::Owned(out)
}

/// Whether a segment has a `.` or `..` piece between encoded slashes/backslashes, backslashes or
/// `;` (see [`PathError::HiddenDotSegment`]).
fn hides_dot_segment(segment: &str) -> bool {
    if !segment.contains('.') {
        return false;
    }
    let lower = segment.to_ascii_lowercase();
    lower
        .replace("%2f", "/")
        .replace("%5c", "/")
        .split(['/', '\\', ';'])
        .any(|piece| piece == "." || piece == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_and_duplicate_slashes_are_removed() {
        for (input, want) in [
            ("/p/../admin", "/admin"),
            ("/p/./x", "/p/x"),
            ("/p//x", "/p/x"),
            ("//p///x//", "/p/x/"),
            ("/p/x/..", "/p/"),
            ("/p/x/.", "/p/x/"),
            ("/p/..", "/"),
            ("/.", "/"),
            ("/", "/"),
            ("//", "/"),
            ("/a/b/../../c", "/c"),
            ("/a//../b", "/b"),
            // Encoded dots are dots (either case); other unreserved characters are decoded too.
            ("/p/%2e%2e/admin", "/admin"),
            ("/p/%2E%2E/admin", "/admin"),
            ("/p/.%2e/admin", "/admin"),
            ("/p/%2e/x", "/p/x"),
            ("/Video%43odec", "/VideoCodec"),
            // Names with dots are not dot-segments.
            ("/p/..a/x", "/p/..a/x"),
            ("/p/.../x", "/p/.../x"),
            ("/p/a.b", "/p/a.b"),
        ] {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn data_encodings_stay_as_they_are() {
        for p in [
            "/p/a%2Fb", "/p/a%20b", "/p/%25", "/p/%zz", "/p/%2", "/p/ünï", "*",
        ] {
            assert_eq!(norm(p).as_deref(), Ok(p));
            assert!(matches!(normalize_path(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn climbing_above_the_root_is_refused() {
        for p in [
            "/..",
            "/../x",
            "/p/../../x",
            "/%2e%2e/x",
            "/a/./../..",
            "/a//..//..//x",
        ] {
            assert_eq!(norm(p), Err(PathError::AboveRoot), "{p}");
        }
    }

    #[test]
    fn dot_segments_hidden_behind_encoded_slashes_are_refused() {
        for p in [
            "/p/..%2Fadmin",
            "/p/..%2fadmin",
            "/p/%2e%2e%2fadmin",
            "/p/x%2F..%2F..%2Fadmin",
            "/p/..%5Cadmin",
            "/p/..\\admin",
            "/p/..;/admin",
            "/p/.;x/admin",
        ] {
            assert_eq!(norm(p), Err(PathError::HiddenDotSegment), "{p}");
        }
    }

    /// RFC 3986 §5.2.4 remove_dot_segments, written as the RFC states it (an input buffer and an
    /// output buffer), as an independent oracle for the segment-stack implementation.
    fn rfc_remove_dot_segments(input: &str) -> String {
        let mut input = input.to_string();
        let mut output = String::new();
        while !input.is_empty() {
            if input.starts_with("../") {
                input.drain(..3);
            } else if input.starts_with("./") || input.starts_with("/./") {
                input.drain(..2);
            } else if input == "/." {
                input = "/".into();
            } else if input.starts_with("/../") || input == "/.." {
                input = if input == "/.." {
                    "/".into()
                } else {
                    input[3..].to_string()
                };
                if let Some(i) = output.rfind('/') {
                    output.truncate(i);
                } else {
                    output.clear();
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input.drain(..end);
            }
        }
        output
    }

    /// How many levels `..` segments climb above the root (0: never above it).
    fn climbs_above_root(path: &str) -> bool {
        let mut depth = 0i32;
        for s in path.split('/').filter(|s| !s.is_empty()) {
            match s {
                "." => {}
                ".." => {
                    depth -= 1;
                    if depth < 0 {
                        return true;
                    }
                }
                _ => depth += 1,
            }
        }
        false
    }

    fn merge_slashes(p: &str) -> String {
        let mut out = String::new();
        for c in p.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        out
    }

    proptest::proptest! {
        /// Paths built from the pieces that matter: slashes, dot-segments, encoded dots, names.
        #[test]
        fn normalisation_agrees_with_rfc_3986_and_is_idempotent(
            parts in proptest::collection::vec(
                proptest::sample::select(vec!["/", "//", ".", "..", "a", "b.c", "%2e", "%2E", "%41", "~"]),
                0..12,
            )
        ) {
            let path = format!("/{}", parts.concat());
            // What the pod's own normalisation would see: unreserved characters decoded.
            let decoded = path.replace("%2e", ".").replace("%2E", ".").replace("%41", "A");
            match normalize_path(&path) {
                Ok(out) => {
                    proptest::prop_assert!(!climbs_above_root(&decoded), "{}", path);
                    proptest::prop_assert_eq!(
                        out.as_ref(), rfc_remove_dot_segments(&merge_slashes(&decoded)), "{}", path
                    );
                    // Nothing left for a pod to resolve differently: normalising again is a no-op.
                    proptest::prop_assert!(
                        matches!(normalize_path(&out), Ok(Cow::Borrowed(_))), "{} -> {}", path, out
                    );
                    proptest::prop_assert!(!out.contains("//"), "{} -> {}", path, out);
                }
                Err(e) => {
                    proptest::prop_assert_eq!(e, PathError::AboveRoot);
                    proptest::prop_assert!(climbs_above_root(&decoded), "{}", path);
                }
            }
        }
    }
}
