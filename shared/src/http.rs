//! HTTP header rules that relay and agent apply alike.

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the classic RFC 2616 list): they
/// describe one connection, so a proxy must not forward them.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Header names a `Connection` header value declares hop-by-hop, lowercased.
pub fn connection_tokens(value: &[u8]) -> impl Iterator<Item = String> + '_ {
    value
        .split(|&b| b == b',')
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
}

/// Whether `name` (lowercase) must be dropped, given the tokens of the message's
/// `Connection` headers.
pub fn is_hop_by_hop(name: &str, connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name) || connection.iter().any(|t| t == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_names_more_hop_by_hop_headers() {
        let tokens: Vec<String> = connection_tokens(b"close, X-Secret ,,").collect();
        assert_eq!(tokens, ["close", "x-secret"]);
        assert!(is_hop_by_hop("x-secret", &tokens));
        assert!(is_hop_by_hop("transfer-encoding", &[]));
        assert!(!is_hop_by_hop("content-type", &tokens));
    }
}
