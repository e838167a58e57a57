//! The inspector's static files, embedded so that `relay-client` is one
//! self-contained binary. This crate knows nothing about HTTP: the agent's
//! inspector serves what [`asset`] returns.

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// File contents.
    pub bytes: &'static [u8],
    /// Its `Content-Type`.
    pub content_type: &'static str,
}

/// The file at `path` (`/` is `index.html`), if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let (bytes, content_type): (&'static [u8], &'static str) = match path {
        "/" | "/index.html" => (
            include_bytes!("../assets/index.html"),
            "text/html; charset=utf-8",
        ),
        "/app.js" => (
            include_bytes!("../assets/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "/style.css" => (
            include_bytes!("../assets/style.css"),
            "text/css; charset=utf-8",
        ),
        _ => return None,
    };
    Some(Asset {
        bytes,
        content_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_assets_are_embedded() {
        assert!(asset("/").is_some_and(|a| a.content_type.starts_with("text/html")));
        assert!(asset("/app.js").is_some());
        assert!(asset("/style.css").is_some());
        assert!(asset("/../Cargo.toml").is_none());
    }
}
