//! The inspector web UI in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/test`), driven over WebDriver,
//! against a real agent behind a real relay. Screenshots of the main views go
//! to `artifacts/screenshots/` (not committed).

mod common;

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use common::*;
use fantoccini::{elements::Element, key::Key, Client, ClientBuilder, Locator};
use http::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use relay_client::Agent;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A chromedriver process and one browser session through it.
struct Browser {
    client: Client,
    _driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A browser session. The chromedriver's port is picked free and then
    /// released, so another test's listener can take it first (a CI run
    /// once met "webdriver server did not respond" there): a failed start
    /// is tried again on a new port, three times at most.
    async fn start(width: u32, height: u32) -> anyhow::Result<Browser> {
        for path in [CHROMIUM, CHROMEDRIVER] {
            anyhow::ensure!(
                std::path::Path::new(path).exists(),
                "{path} is missing: the browser tests need Debian's chromium and \
                 chromium-driver; scripts/test installs them"
            );
        }
        let mut attempt = 1;
        loop {
            match Self::start_once(width, height).await {
                Ok(browser) => return Ok(browser),
                Err(err) if attempt < 3 => {
                    eprintln!("browser start {attempt} of 3 failed, trying again: {err:#}");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_once(width: u32, height: u32) -> anyhow::Result<Browser> {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            anyhow::ensure!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir()?;
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ],
            }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await?;
        Ok(Browser {
            client,
            _driver: driver,
            _profile: profile,
        })
    }

    async fn open(&self, url: &str) -> anyhow::Result<()> {
        self.client.goto(url).await?;
        self.until(
            "document.documentElement.dataset.ready === '1'",
            "the page to load",
        )
        .await?;
        // Record any Content-Security-Policy violation from now on.
        self.js(
            "window.__csp = []; document.addEventListener('securitypolicyviolation', \
             e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));",
        )
        .await?;
        Ok(())
    }

    /// Runs `body` as a function body in the page and returns its result.
    async fn js(&self, body: &str) -> anyhow::Result<Value> {
        Ok(self.client.execute(body, vec![]).await?)
    }

    /// Waits until the JavaScript expression `expr` is truthy.
    async fn until(&self, expr: &str, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.js(&format!("return !!({expr});")).await?;
            if v == Value::Bool(true) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn rows(&self) -> anyhow::Result<usize> {
        let n = self
            .js("return document.querySelectorAll('#list .row').length;")
            .await?;
        Ok(n.as_u64().unwrap_or(0) as usize)
    }

    async fn until_rows(&self, n: usize) -> anyhow::Result<()> {
        self.until(
            &format!("document.querySelectorAll('#list .row').length === {n}"),
            &format!("{n} rows in the list"),
        )
        .await
    }

    async fn find(&self, css: &str) -> anyhow::Result<Element> {
        Ok(self
            .client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await?)
    }

    async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.find(css).await?.click().await?;
        Ok(())
    }

    async fn text(&self, css: &str) -> anyhow::Result<String> {
        Ok(self.find(css).await?.text().await?)
    }

    async fn screenshot(&self, name: &str) -> anyhow::Result<()> {
        let png = self.client.screenshot().await?;
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("artifacts")
            .join("screenshots");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    async fn csp_violations(&self) -> anyhow::Result<Value> {
        self.js("return window.__csp;").await
    }

    async fn close(self) -> anyhow::Result<()> {
        self.client.close().await?;
        Ok(())
    }
}

fn inspector(agent: &Agent) -> anyhow::Result<String> {
    let addr = agent
        .inspector_addr()
        .ok_or_else(|| anyhow::anyhow!("inspector off"))?;
    Ok(format!("http://{addr}/"))
}

async fn post_json(url: &str, body: &Value) -> anyhow::Result<StatusCode> {
    let req = Request::post(url)
        .header("content-type", "application/json")
        .body(full(body.to_string()))?;
    Ok(send(req).await?.0)
}

#[tokio::test]
async fn live_list_detail_replay_edit_diff_and_filter() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.inspected_agent("ui", &app.target()).await?;
    let browser = Browser::start(1280, 800).await?;
    browser.open(&inspector(&agent)?).await?;

    // Connection state and public URL come from the live status.
    browser
        .until(
            "document.querySelector('#conn')?.dataset.state === 'connected'",
            "the connected state",
        )
        .await?;
    assert_eq!(
        browser.text("#urls .public-url").await?,
        relay.url("ui", "/")
    );
    assert_eq!(browser.rows().await?, 0);

    // A webhook sent to the public URL appears without a reload.
    let marker = "document.__sameDocument = true; return true;";
    browser.js(marker).await?;
    let event = json!({
        "id": "evt_1",
        "type": "payment_intent.succeeded",
        "data": { "object": { "amount": 2000, "currency": "eur", "tags": ["a", "b"] } }
    });
    assert_eq!(
        post_json(&relay.url("ui", "/stripe/events"), &event).await?,
        StatusCode::OK
    );
    browser.until_rows(1).await?;
    assert_eq!(
        browser
            .js("return document.__sameDocument === true;")
            .await?,
        Value::Bool(true),
        "the row arrived live, not through a reload"
    );
    assert_eq!(browser.text("#list .row .method").await?, "POST");
    assert_eq!(browser.text("#list .row .path").await?, "/stripe/events");
    let class = browser
        .js("return document.querySelector('#list .row .status').dataset.class;")
        .await?;
    assert_eq!(class, "2xx");
    browser.screenshot("list").await?;

    // The detail shows the pretty JSON.
    browser.click("#list .row").await?;
    browser
        .until("document.querySelector('#detail .json')", "pretty JSON")
        .await?;
    let pretty = browser.text("#detail .body-view").await?;
    assert!(
        pretty.contains("payment_intent.succeeded") && pretty.contains("2000"),
        "{pretty}"
    );
    let keys = browser
        .js("return [...document.querySelectorAll('#detail .json .json-key')].map(k => k.textContent);")
        .await?;
    let keys = keys.to_string();
    assert!(
        keys.contains("currency") && keys.contains("amount"),
        "{keys}"
    );
    // Nested values are laid out on their own lines, not as one line of JSON.
    assert!(pretty.lines().count() > 5, "{pretty}");
    let headers = browser.text("#detail table.headers").await?;
    assert!(headers.contains("content-type"), "{headers}");
    browser.screenshot("detail").await?;
    let original = browser
        .js("return document.querySelector('#detail').dataset.id;")
        .await?;
    let original = original.as_str().unwrap_or_default().to_owned();
    assert_eq!(original.len(), 26, "a ULID: {original}");

    // Replay: a new entry arrives live, marked as a replay; the app got it again.
    browser.click("#replay").await?;
    browser.until_rows(2).await?;
    browser
        .until(
            "document.querySelector('#list .row .replay-mark')",
            "the replay marker",
        )
        .await?;
    assert_eq!(app.received().len(), 2);
    assert_eq!(app.received()[1].body, app.received()[0].body);

    // Edit and replay: method, path, a header and the body, all changed.
    browser
        .client
        .execute(
            "document.querySelector(`#list .row[data-id='${arguments[0]}']`).click();",
            vec![json!(original)],
        )
        .await?;
    browser
        .until(
            &format!("document.querySelector('#detail').dataset.id === '{original}'"),
            "the original's detail",
        )
        .await?;
    browser.click("#edit-replay").await?;
    browser.find("#edit-body").await?;
    let method = browser.find("#edit-method").await?;
    if method.tag_name().await? == "select" {
        browser
            .js(
                "const m = document.querySelector('#edit-method'); m.value = 'PUT'; \
                 m.dispatchEvent(new Event('change', {bubbles: true}));",
            )
            .await?;
    } else {
        method.clear().await?;
        method.send_keys("PUT").await?;
    }
    let path = browser.find("#edit-path").await?;
    path.clear().await?;
    path.send_keys("/stripe/edited?v=2").await?;
    let headers = browser.find("#edit-headers").await?;
    headers
        .send_keys(&format!("{}X-Edited: yes", Key::Enter))
        .await?;
    let body = browser.find("#edit-body").await?;
    body.clear().await?;
    body.send_keys(r#"{"edited":true,"amount":1}"#).await?;
    browser.screenshot("edit-and-replay").await?;
    browser.click("#edit-send").await?;
    browser.until_rows(3).await?;
    let got = app.received();
    let edited = got
        .last()
        .ok_or_else(|| anyhow::anyhow!("the edited replay did not reach the app"))?;
    assert_eq!(edited.method, "PUT");
    assert_eq!(edited.uri, "/stripe/edited?v=2");
    assert_eq!(edited.header("x-edited"), [&b"yes"[..]]);
    assert_eq!(&edited.body[..], br#"{"edited":true,"amount":1}"#);

    // Compare the edited replay with its original, side by side.
    browser
        .until(
            &format!(
                "document.querySelector('#detail').dataset.id !== '{original}' && \
                 document.querySelector('#compare')"
            ),
            "the new exchange selected, with a compare button",
        )
        .await?;
    browser.click("#compare").await?;
    browser
        .until(
            "document.querySelector('#diff .diff-body .diff-add') && \
             document.querySelector('#diff .diff-body .diff-del')",
            "a body diff",
        )
        .await?;
    let added = browser
        .js("return [...document.querySelectorAll('#diff .diff-body .diff-add')].map(l => l.textContent).join('\\n');")
        .await?;
    assert!(added.to_string().contains("edited"), "{added}");
    let header_diff = browser.text("#diff .diff-headers").await?;
    assert!(
        header_diff.to_lowercase().contains("x-edited"),
        "{header_diff}"
    );
    browser.screenshot("diff").await?;

    // The filter narrows the list through the API, and clearing restores it.
    browser
        .js("document.querySelector('#diff')?.querySelector('.close')?.click(); return 1;")
        .await?;
    let filter = browser.find("#filter").await?;
    filter
        .send_keys(&format!("method:PUT{}", Key::Enter))
        .await?;
    browser.until_rows(1).await?;
    assert_eq!(
        browser.text("#list .row .path").await?,
        "/stripe/edited?v=2"
    );
    filter.clear().await?;
    filter.send_keys(&format!("amount{}", Key::Enter)).await?;
    browser.until_rows(3).await?;
    filter.clear().await?;
    filter
        .send_keys(&format!("status:5xx{}", Key::Enter))
        .await?;
    browser.until_rows(0).await?;
    filter.clear().await?;
    filter.send_keys(&Key::Enter.to_string()).await?;
    browser.until_rows(3).await?;

    // Keyboard: down moves the selection, enter opens, r replays.
    browser
        .js("document.activeElement.blur(); return 1;")
        .await?;
    let body = browser.find("body").await?;
    body.send_keys(&format!("{}{}", Key::Down, Key::Down))
        .await?;
    body.send_keys(&Key::Enter.to_string()).await?;
    browser
        .until(
            "document.querySelector('#list .row.selected') && \
             document.querySelector('#detail').dataset.id === \
             document.querySelector('#list .row.selected').dataset.id",
            "the keyboard selection opened",
        )
        .await?;
    body.send_keys("r").await?;
    browser.until_rows(4).await?;

    assert_eq!(browser.csp_violations().await?, json!([]));
    browser.close().await?;
    Ok(())
}

#[tokio::test]
async fn webhook_content_is_inert_text_under_a_strict_csp() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.inspected_agent("evil", &app.target()).await?;
    let browser = Browser::start(1280, 800).await?;
    browser.open(&inspector(&agent)?).await?;

    let script = "<script>window.__pwned = 'script'</script>";
    let img = "<img src=x onerror=\"window.__pwned = 'img'\">";
    let req = Request::post(relay.url("evil", &format!("/x?q={}", "%3Cscript%3E")))
        .header("content-type", "text/html")
        .header("x-evil", img)
        .body(full(format!("{script}{img}")))?;
    assert_eq!(send(req).await?.0, StatusCode::OK);
    let json_body = json!({ "html": script, "img": img, img: script });
    post_json(&relay.url("evil", "/json"), &json_body).await?;
    browser.until_rows(2).await?;

    for row in 0..2 {
        browser
            .js(&format!(
                "document.querySelectorAll('#list .row')[{row}].click(); return 1;"
            ))
            .await?;
        for view in ["pretty", "raw", "hex"] {
            for tab in ["request", "response"] {
                browser
                    .js(&format!(
                        "document.querySelector('#detail button[data-tab=\"{tab}\"]')?.click(); \
                         document.querySelector('#detail button[data-view=\"{view}\"]')?.click(); \
                         return 1;"
                    ))
                    .await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        browser
            .js(
                "document.querySelector('#detail button[data-tab=\"request\"]')?.click(); \
                 document.querySelector('#detail button[data-view=\"raw\"]')?.click(); return 1;",
            )
            .await?;
        let text = browser.text("#detail").await?;
        assert!(
            text.contains("<script>") || text.contains("\\u003cscript"),
            "the payload is shown as text: {text}"
        );
    }
    let headers = browser.text("#detail table.headers").await?;
    let _ = headers;
    browser
        .js("document.querySelectorAll('#list .row')[1].click(); return 1;")
        .await?;
    browser
        .until(
            "[...document.querySelectorAll('#detail table.headers td.value')] \
             .some(td => td.textContent.includes('<img src=x onerror'))",
            "the hostile header shown as text",
        )
        .await?;
    browser.screenshot("injection").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        browser.js("return window.__pwned ?? null;").await?,
        Value::Null,
        "no payload ran"
    );
    let injected = browser
        .js("return document.querySelectorAll('#list img, #detail img, #list script, #detail script').length;")
        .await?;
    assert_eq!(
        injected,
        json!(0),
        "no element was created from webhook data"
    );
    assert_eq!(browser.csp_violations().await?, json!([]));

    // The page is served with the strict policy.
    let (status, headers, _) = send(Request::get(inspector(&agent)?).body(full(""))?).await?;
    assert_eq!(status, StatusCode::OK);
    let csp = headers
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    browser.close().await?;
    Ok(())
}

#[tokio::test]
async fn narrow_window_stacks_list_and_detail() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let agent = relay.inspected_agent("narrow", &app.target()).await?;
    let browser = Browser::start(420, 900).await?;
    browser.open(&inspector(&agent)?).await?;
    post_json(
        &relay.url("narrow", "/github"),
        &json!({"zen": "Keep it logically awesome."}),
    )
    .await?;
    browser.until_rows(1).await?;
    // Nothing overflows sideways at phone width.
    let overflow = browser
        .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth;")
        .await?;
    assert!(
        overflow.as_i64().unwrap_or(i64::MAX) <= 1,
        "horizontal overflow: {overflow}"
    );
    browser.screenshot("narrow-list").await?;
    browser.click("#list .row").await?;
    browser
        .until("document.querySelector('#detail .json')", "the detail")
        .await?;
    let visible = browser
        .js(
            "const r = document.querySelector('#detail').getBoundingClientRect(); \
             return r.width > 300 && r.left >= -1 && r.right <= window.innerWidth + 1;",
        )
        .await?;
    assert_eq!(
        visible,
        Value::Bool(true),
        "the detail fills the narrow window"
    );
    browser.screenshot("narrow-detail").await?;
    browser.close().await?;
    Ok(())
}

/// Webhooks delivered from the relay's queue are marked in the list and the
/// detail, and a retried one shows its attempt.
#[tokio::test]
async fn queued_deliveries_and_retries_are_marked() -> anyhow::Result<()> {
    let app = TestApp::spawn().await?;
    let relay = TestRelay::spawn().await?;
    let mut config = relay.agent_config(Some("queued-ui"), &app.target());
    config.inspect = Some("127.0.0.1:0".parse()?);
    config.settings.mode = hookrelay_shared::DeliveryMode::Queue;
    config.retry = relay_client::queued::RetryPolicy {
        attempts: 2,
        initial: Duration::from_millis(50),
        max: Duration::from_millis(100),
    };
    let agent = connected_agent(config).await?;
    let browser = Browser::start(1280, 800).await?;
    browser.open(&inspector(&agent)?).await?;
    let ok = post_json(&relay.url("queued-ui", "/github"), &json!({"n": 1})).await?;
    assert_eq!(ok, StatusCode::ACCEPTED);
    let failing = post_json(&relay.url("queued-ui", "/status/503"), &json!({"n": 2})).await?;
    assert_eq!(failing, StatusCode::ACCEPTED);
    // /github once, /status/503 twice (retry 1/2, then failed 2/2).
    browser.until_rows(3).await?;
    let marks = browser
        .js("return [...document.querySelectorAll('#list .queue-mark')].map(e => e.textContent);")
        .await?;
    let marks: Vec<String> = serde_json::from_value(marks)?;
    let mut sorted = marks.clone();
    sorted.sort();
    assert_eq!(sorted, ["failed 2/2", "queued", "retry 1/2"], "{marks:?}");
    browser.click("#list .queue-mark.failed").await?;
    browser
        .until(
            "[...document.querySelectorAll('#detail *')].some(e => e.textContent.includes('no more attempts'))",
            "the failed attempt explained in the detail",
        )
        .await?;
    let raw = browser
        .js("return [...document.querySelectorAll('#detail *')].some(e => e.textContent.startsWith('{\"attempt\"'));")
        .await?;
    assert_eq!(
        raw,
        Value::Bool(false),
        "the attempt shown as a badge, not raw JSON"
    );
    browser.screenshot("queued-failed").await?;
    browser.close().await?;
    Ok(())
}
