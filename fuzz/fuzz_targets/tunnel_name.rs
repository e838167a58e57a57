//! Arbitrary text as a tunnel name and as a token's tunnel pattern. A name
//! that parses is a DNS label that survives display, parsing and the wire; a
//! pattern matches the names it should. Input: `PATTERN\nNAME`.

#![no_main]

use hookrelay_shared::{tunnel_name::MAX_TUNNEL_NAME_LEN, TunnelName, TunnelPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, name) = text.split_once('\n').unwrap_or(("*", text));

    let Ok(parsed) = name.parse::<TunnelName>() else {
        return;
    };
    let s = parsed.as_str();
    assert!(!s.is_empty() && s.len() <= MAX_TUNNEL_NAME_LEN, "{s:?}");
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
        "{s:?}"
    );
    assert!(!s.starts_with('-') && !s.ends_with('-'), "{s:?}");
    assert_eq!(
        s.parse::<TunnelName>().as_ref(),
        Ok(&parsed),
        "not idempotent"
    );
    assert_eq!(parsed.to_string(), s);
    let wire = postcard::to_allocvec(&parsed).expect("a name serialises");
    let back: TunnelName = postcard::from_bytes(&wire).expect("a name deserialises");
    assert_eq!(back, parsed);

    // Every name matches `*` and itself; a pattern is case-insensitive.
    let star: TunnelPattern = "*".parse().expect("`*` is a pattern");
    assert!(star.matches(&parsed));
    let exact: TunnelPattern = s.parse().expect("a name is a pattern");
    assert!(exact.matches(&parsed));
    if let Ok(p) = pattern.parse::<TunnelPattern>() {
        let upper: TunnelPattern = pattern
            .to_ascii_uppercase()
            .parse()
            .expect("case does not change validity");
        assert_eq!(p.matches(&parsed), upper.matches(&parsed));
        // A pattern without `*` matches exactly one name.
        if !pattern.contains('*') {
            assert_eq!(p.matches(&parsed), p.as_str() == s, "{pattern:?} vs {s:?}");
        }
    }
});
