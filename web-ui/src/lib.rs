//! The inspector's static files, embedded so that `relay-client` is one
//! self-contained binary. This crate knows nothing about HTTP: the agent's
//! inspector serves what [`asset`] returns.
//!
//! The UI is plain HTML, CSS and JavaScript modules (no build step). It runs
//! under a strict Content-Security-Policy (`script-src 'self'`, `style-src
//! 'self'`, no inline code or styles) and renders every piece of webhook data
//! as text, never as markup.

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// File contents.
    pub bytes: &'static [u8],
    /// Its `Content-Type`.
    pub content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Every served path except `/` (an alias of `/index.html`).
pub const PATHS: &[&str] = &[
    "/index.html",
    "/style.css",
    "/favicon.svg",
    "/app.js",
    "/api.js",
    "/body.js",
    "/compare.js",
    "/diff.js",
    "/dom.js",
    "/editor.js",
    "/filter.js",
    "/format.js",
    "/json.js",
    "/live.js",
    "/render.js",
    "/xml.js",
];

/// The file at `path` (`/` is `index.html`), if there is one.
pub fn asset(path: &str) -> Option<Asset> {
    let (bytes, content_type): (&'static [u8], &'static str) = match path {
        "/" | "/index.html" => (include_bytes!("../assets/index.html"), HTML),
        "/style.css" => (include_bytes!("../assets/style.css"), CSS),
        "/favicon.svg" => (include_bytes!("../assets/favicon.svg"), SVG),
        "/app.js" => (include_bytes!("../assets/app.js"), JS),
        "/api.js" => (include_bytes!("../assets/api.js"), JS),
        "/body.js" => (include_bytes!("../assets/body.js"), JS),
        "/compare.js" => (include_bytes!("../assets/compare.js"), JS),
        "/diff.js" => (include_bytes!("../assets/diff.js"), JS),
        "/dom.js" => (include_bytes!("../assets/dom.js"), JS),
        "/editor.js" => (include_bytes!("../assets/editor.js"), JS),
        "/filter.js" => (include_bytes!("../assets/filter.js"), JS),
        "/format.js" => (include_bytes!("../assets/format.js"), JS),
        "/json.js" => (include_bytes!("../assets/json.js"), JS),
        "/live.js" => (include_bytes!("../assets/live.js"), JS),
        "/render.js" => (include_bytes!("../assets/render.js"), JS),
        "/xml.js" => (include_bytes!("../assets/xml.js"), JS),
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

    fn text(path: &str) -> &'static str {
        let a = asset(path).unwrap_or_else(|| panic!("{path} is embedded"));
        std::str::from_utf8(a.bytes).unwrap_or_else(|_| panic!("{path} is UTF-8"))
    }

    /// Paths a file refers to: `src="/x"`/`href="/x"` in HTML, `from "./x.js"`
    /// and `import("./x.js")` in JavaScript.
    fn references(body: &str) -> Vec<String> {
        let mut out = Vec::new();
        for marker in ["src=\"/", "href=\"/", "from \"./", "import(\"./"] {
            let mut rest = body;
            while let Some(i) = rest.find(marker) {
                rest = &rest[i + marker.len()..];
                if let Some(end) = rest.find('"') {
                    out.push(format!("/{}", &rest[..end]));
                }
            }
        }
        out
    }

    #[test]
    fn index_and_assets_are_embedded() {
        assert!(asset("/").is_some_and(|a| a.content_type.starts_with("text/html")));
        assert!(asset("/app.js").is_some());
        assert!(asset("/style.css").is_some());
        assert!(asset("/../Cargo.toml").is_none());
        assert!(asset("/assets/app.js").is_none());
        assert!(asset("").is_none());
    }

    #[test]
    fn every_listed_path_is_served_with_its_type() {
        for path in PATHS {
            let a = asset(path).unwrap_or_else(|| panic!("{path} is embedded"));
            assert!(!a.bytes.is_empty(), "{path} is not empty");
            let want = match path.rsplit_once('.').map(|(_, ext)| ext) {
                Some("js") => "text/javascript",
                Some("css") => "text/css",
                Some("html") => "text/html",
                Some("svg") => "image/svg+xml",
                other => panic!("{path}: unexpected extension {other:?}"),
            };
            assert!(
                a.content_type.starts_with(want),
                "{path}: {}",
                a.content_type
            );
        }
        assert_eq!(
            asset("/").map(|a| a.bytes),
            asset("/index.html").map(|a| a.bytes)
        );
    }

    #[test]
    fn everything_the_page_loads_is_embedded() {
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec!["/index.html".to_owned()];
        while let Some(path) = todo.pop() {
            if !seen.insert(path.clone()) {
                continue;
            }
            for r in references(text(&path)) {
                assert!(
                    asset(&r).is_some(),
                    "{path} refers to {r}, which is not embedded"
                );
                if r.ends_with(".js") {
                    todo.push(r);
                }
            }
        }
        // And nothing is embedded that the page never loads.
        for path in PATHS {
            assert!(
                seen.contains(*path) || !path.ends_with(".js"),
                "{path} is never imported"
            );
        }
    }

    #[test]
    fn markup_has_no_inline_code_or_styles() {
        // The inspector's CSP forbids inline scripts, styles and handlers.
        let html = text("/index.html").to_ascii_lowercase();
        assert!(!html.contains("style="), "inline style attribute");
        assert!(!html.contains("<style"), "inline <style>");
        assert!(!html.contains("javascript:"), "javascript: URL");
        let bytes = html.as_bytes();
        for (i, _) in html.match_indices(" on") {
            let name_len = bytes[i + 3..]
                .iter()
                .take_while(|b| b.is_ascii_lowercase())
                .count();
            assert!(
                name_len == 0 || bytes.get(i + 3 + name_len) != Some(&b'='),
                "inline event handler near {:?}",
                &html[i..(i + 20).min(html.len())]
            );
        }
        for tag in html.split("<script").skip(1) {
            let (open, body) = tag.split_once('>').unwrap_or((tag, ""));
            assert!(open.contains("src="), "inline <script>: {open}");
            let body = body.split("</script>").next().unwrap_or_default();
            assert!(body.trim().is_empty(), "inline script body: {body}");
        }
    }

    #[test]
    fn scripts_never_parse_html_or_evaluate_strings() {
        for path in PATHS.iter().filter(|p| p.ends_with(".js")) {
            let js = text(path);
            for banned in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "createContextualFragment",
                "setAttribute(\"style\"",
                "DOMParser",
            ] {
                assert!(!js.contains(banned), "{path} uses {banned}");
            }
        }
    }
}
