//! Redis-style glob matching for `KEYS`: `*`, `?`, `[abc]`, `[^a-z]`, and `\`
//! escaping the next byte.
//!
//! Matching backtracks only to the most recent `*`, which is enough for
//! globs (a later star can absorb whatever an earlier one would) and keeps the
//! cost at O(pattern × key) even for hostile patterns like `*a*a*a*a*b`.

/// Whether `key` matches the glob `pattern`.
pub fn matches(pattern: &[u8], key: &[u8]) -> bool {
    let mut p = 0;
    let mut k = 0;
    // Pattern position after the last star and the key position it was tried at.
    let mut resume: Option<(usize, usize)> = None;
    while k < key.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                p += 1;
                resume = Some((p, k));
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') => match_class(pattern, p, key[k]),
            Some(b'\\') if p + 1 < pattern.len() => (pattern[p + 1] == key[k]).then_some(p + 2),
            Some(&literal) => (literal == key[k]).then_some(p + 1),
            None => None,
        };
        match (step, resume) {
            (Some(next), _) => {
                p = next;
                k += 1;
            }
            (None, Some((star_next, star_key))) => {
                p = star_next;
                k = star_key + 1;
                resume = Some((star_next, star_key + 1));
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&b| b == b'*')
}

/// Matches one byte against the class starting at `pattern[open] == b'['`;
/// returns the pattern position after the class on success. An unterminated
/// class extends to the end of the pattern, as in Redis.
fn match_class(pattern: &[u8], open: usize, byte: u8) -> Option<usize> {
    let mut i = open + 1;
    let negated = pattern.get(i) == Some(&b'^');
    if negated {
        i += 1;
    }
    let mut hit = false;
    while i < pattern.len() && pattern[i] != b']' {
        if pattern[i] == b'\\' && i + 1 < pattern.len() {
            hit |= pattern[i + 1] == byte;
            i += 2;
        } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' && pattern[i + 2] != b']' {
            let (low, high) = if pattern[i] <= pattern[i + 2] {
                (pattern[i], pattern[i + 2])
            } else {
                (pattern[i + 2], pattern[i])
            };
            hit |= (low..=high).contains(&byte);
            i += 3;
        } else {
            hit |= pattern[i] == byte;
            i += 1;
        }
    }
    let after = (i + 1).min(pattern.len());
    (hit != negated).then_some(after)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards() {
        assert!(matches(b"*", b""));
        assert!(matches(b"*", b"anything"));
        assert!(matches(b"h?llo", b"hello"));
        assert!(!matches(b"h?llo", b"hllo"));
        assert!(matches(b"h*llo", b"hllo"));
        assert!(matches(b"h*llo", b"heeeello"));
        assert!(matches(b"user:*:name", b"user:42:name"));
        assert!(!matches(b"user:*:name", b"user:42:names"));
        assert!(matches(b"**a**", b"banana"));
        assert!(!matches(b"", b"a"));
        assert!(matches(b"", b""));
    }

    #[test]
    fn classes_and_escapes() {
        assert!(matches(b"h[ae]llo", b"hello"));
        assert!(matches(b"h[ae]llo", b"hallo"));
        assert!(!matches(b"h[ae]llo", b"hillo"));
        assert!(matches(b"h[^e]llo", b"hallo"));
        assert!(!matches(b"h[^e]llo", b"hello"));
        assert!(matches(b"h[a-b]llo", b"hbllo"));
        assert!(matches(b"h[b-a]llo", b"hallo"));
        assert!(!matches(b"h[a-b]llo", b"hcllo"));
        assert!(matches(b"a\\*b", b"a*b"));
        assert!(!matches(b"a\\*b", b"axb"));
        assert!(matches(b"[\\]]", b"]"));
        assert!(matches(b"a[bc", b"ab"));
    }

    #[test]
    fn hostile_pattern_stays_fast() {
        let key = [b'a'; 4096];
        assert!(!matches(b"*a*a*a*a*a*a*a*a*a*a*b", &key));
    }
}
