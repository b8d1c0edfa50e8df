//! The page in a real browser: headless Chromium, driven over WebDriver by `chromedriver`.
//!
//! `scripts/test.sh` installs Debian's `chromium` and `chromium-driver`; without them these tests
//! fail and say so (set `KOBE_CHROMEDRIVER` to use another driver).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{eventually, Running, TestEnv};

const TOKEN: &str = "browser-token-0123456789abcdef";
/// WebDriver's key for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A `chromedriver` of our own and one headless Chromium session on it.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    session: String,
    profile: std::path::PathBuf,
}

impl Browser {
    async fn start() -> Self {
        let binary = std::env::var("KOBE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let driver = Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start {binary} ({error}): install Debian's chromium and chromium-driver \
                     (scripts/test.sh does) or set KOBE_CHROMEDRIVER"
                )
            });
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        eventually(Duration::from_secs(20), "chromedriver up", || {
            let http = http.clone();
            let base = base.clone();
            async move { http.get(format!("{base}/status")).send().await.ok() }
        })
        .await;
        let profile = std::env::temp_dir().join(crate::common::unique("kobe-chromedriver"));
        std::fs::create_dir_all(&profile).unwrap();
        let mut args = vec![
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-background-networking".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        if let Ok(extra) = std::env::var("KOBE_CHROMIUM_ARGS") {
            args.extend(extra.split_whitespace().map(str::to_owned));
        }
        let mut options = json!({ "args": args });
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"))
            .to_owned();
        Self {
            driver,
            http,
            session: format!("{base}/session/{session}"),
            profile,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if !body.is_null() {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        if answer["value"]["error"].is_string() {
            panic!("WebDriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", json!({ "url": url }))
            .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await;
    }

    async fn run(&self, script: &str) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn text(&self) -> String {
        self.run("return document.body ? document.body.innerText : ''")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium (killing the driver alone would leave it running);
        // a plain request, as this may run while a test unwinds.
        if let Some((address, path)) = self
            .session
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        {
            use std::io::{Read, Write};
            if let Ok(mut stream) = std::net::TcpStream::connect(address) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    stream,
                    "DELETE /{path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves one page, to every request, from another origin of the same host: a different port is
/// the same *site*, so the browser sends a `SameSite=Strict` cookie along with its requests.
async fn serve_page(html: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut request = vec![0u8; 8192];
                let _ = stream.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_in_browser_cannot_be_made_to_purge_from_another_origin_and_the_page_still_works()
{
    let Running { env, api, worker } =
        TestEnv::with_worker(&[("KOBE_API_TOKENS", TOKEN), ("KOBE_RETRY_MAX", "0")], 2).await;
    let id = crate::security::a_dead_letter(&env, &api, TOKEN).await;
    eventually(Duration::from_secs(20), "the dead letter", || async {
        (crate::security::dead_letters(&api, TOKEN).await == 1).then_some(())
    })
    .await;

    let browser = Browser::start().await;
    // Signing in through the page's own form.
    browser.go(&format!("{}/ui/login", api.address)).await;
    browser.type_into("input[name=token]", TOKEN).await;
    browser.click("button").await;
    eventually(Duration::from_secs(10), "signed in", || async {
        let url = browser.url().await;
        (!url.contains("/ui/login") && browser.text().await.contains(&id[..8])).then_some(())
    })
    .await;
    let cookies = browser
        .call(reqwest::Method::GET, "/cookie", Value::Null)
        .await;
    let cookies = cookies.to_string();
    assert!(
        !cookies.contains(TOKEN),
        "the cookie carries the token: {cookies}"
    );

    // Another origin's page, while the browser holds the session: a script's "simple" request (no
    // preflight) and a form post, both aimed at the purge.
    let purge = format!("{}/dlq/purge", api.address);
    let evil = serve_page(format!(
        r#"<!doctype html><title>waiting</title>
<form id="f" method="post" action="{purge}" enctype="text/plain"><input name='{{"confirm":true,"x":"' value='"}}'></form>
<script>
fetch("{purge}", {{method: "POST", mode: "no-cors", credentials: "include",
  headers: {{"content-type": "text/plain"}}, body: '{{"confirm":true}}'}})
  .finally(() => {{ document.title = "sent"; }});
</script>"#
    ))
    .await;
    browser.go(&evil).await;
    eventually(
        Duration::from_secs(10),
        "the script's request sent",
        || async { (browser.run("return document.title").await == "sent").then_some(()) },
    )
    .await;
    browser.run("document.getElementById('f').submit()").await;
    let answer = eventually(Duration::from_secs(10), "the form's answer", || async {
        let url = browser.url().await;
        let text = browser.text().await;
        (url.starts_with(&purge) && !text.is_empty()).then_some(text)
    })
    .await;
    // 403, not 401: the browser sent the cookie, and Kobe refused the request for its origin.
    assert!(
        answer.contains("forbidden") && answer.contains("another site or origin"),
        "the form post was answered: {answer}"
    );
    assert_eq!(
        crate::security::dead_letters(&api, TOKEN).await,
        1,
        "something was purged"
    );

    // The page's own button still works: replay the letter from the page.
    browser.go(&format!("{}/ui", api.address)).await;
    browser.click(&format!("button[data-replay='{id}']")).await;
    eventually(
        Duration::from_secs(20),
        "the letter replayed and run",
        || async {
            let status: Value = api
                .client
                .get(format!("{}/task/status/{id}", api.address))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (status["state"] == "SUCCESS").then_some(())
        },
    )
    .await;
    assert_eq!(crate::security::dead_letters(&api, TOKEN).await, 0);
    worker.stop().await;
    api.handle.stop(false).await;
}
