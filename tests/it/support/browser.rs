//! A real headless Chromium for the console's tests, driven over WebDriver: Debian's
//! `chromium` and `chromedriver` (installed by scripts/test-deps), one chromedriver per test on
//! a free port, killed on drop. Controls are found as a user (and a screen reader) finds them:
//! by their label or visible name, which is what the interface promises to keep.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, elements::Element};
use hyper_util::client::legacy::connect::HttpConnector;

use super::harness::{Proc, free_port};

/// How long a page or condition is waited for.
pub const WAIT: Duration = Duration::from_secs(20);

/// A browser session and its chromedriver.
pub struct Browser {
    pub client: Client,
    _driver: Proc,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium window of `width` × 900 CSS pixels.
    pub async fn start(width: u32) -> Browser {
        let port = free_port();
        let driver = Proc(
            Command::new(
                std::env::var("WAGATE_TEST_CHROMEDRIVER")
                    .unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
            )
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver: run scripts/test-deps"),
        );
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": std::env::var("WAGATE_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    format!("--window-size={width},900"), "--force-device-scale-factor=1",
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        let client = loop {
            let connected = ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await;
            match connected {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("chromedriver did not answer: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Browser {
            client,
            _driver: driver,
        }
    }

    /// Ends the browser session, so that chromedriver takes Chromium down with it.
    pub async fn close(self) {
        let _ = self.client.close().await;
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// Goes to `path` on the current page's origin.
    pub async fn goto_path(&self, path: &str) {
        let url = self.client.current_url().await.expect("url");
        let url = url.join(path).expect("a path");
        self.goto(url.as_str()).await;
    }

    /// The page's visible text.
    pub async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The path of the current page.
    pub async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("url")
            .path()
            .to_owned()
    }

    /// The page's HTML as the browser has it now (scripts' changes included).
    pub async fn html(&self) -> String {
        self.client.source().await.expect("page source")
    }

    /// Waits until `locator` finds an element.
    pub async fn find(&self, locator: Locator<'_>, what: &str) -> Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(e) = self.client.find(locator).await {
                return e;
            }
            if Instant::now() > deadline {
                panic!(
                    "no {what} on {} after {WAIT:?}:\n{}",
                    self.path().await,
                    self.html().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The input, select or textarea labelled `label` (its `<label for>`).
    pub async fn field(&self, label: &str) -> Element {
        let xpath = format!("//*[@id=//label[normalize-space(.)={}]/@for]", quote(label));
        self.find(Locator::XPath(&xpath), &format!("field {label:?}"))
            .await
    }

    /// The button named `name` (its text or aria-label).
    pub async fn button(&self, name: &str) -> Element {
        let xpath = format!(
            "//button[normalize-space(.)={0} or @aria-label={0}]",
            quote(name)
        );
        self.find(Locator::XPath(&xpath), &format!("button {name:?}"))
            .await
    }

    /// The link named `name`.
    pub async fn link(&self, name: &str) -> Element {
        let xpath = format!("//a[normalize-space(.)={}]", quote(name));
        self.find(Locator::XPath(&xpath), &format!("link {name:?}"))
            .await
    }

    /// Types `text` into the field labelled `label`, replacing what it held.
    pub async fn fill(&self, label: &str, text: &str) {
        let f = self.field(label).await;
        f.clear().await.expect("clear");
        f.send_keys(text).await.expect("type");
    }

    pub async fn click_button(&self, name: &str) {
        self.button(name).await.click().await.expect("click");
    }

    pub async fn click_link(&self, name: &str) {
        self.link(name).await.click().await.expect("click");
    }

    /// Waits until the page's visible text satisfies `done`; fails showing the page.
    pub async fn wait_for_text(&self, what: &str, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text().await;
            if done(&text) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what} on {}:\n{text}",
                    self.path().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the current page's path is `path`.
    pub async fn wait_for_path(&self, path: &str) {
        let deadline = Instant::now() + WAIT;
        while self.path().await != path {
            if Instant::now() > deadline {
                panic!(
                    "expected to be on {path}, still on {}:\n{}",
                    self.path().await,
                    self.html().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The value of the console's session cookie, if the browser holds one.
    pub async fn session_cookie(&self) -> Option<String> {
        self.client
            .get_named_cookie("wagate_console")
            .await
            .ok()
            .map(|c| c.value().to_owned())
    }

    /// Takes a screenshot of the window and, with `WAGATE_TEST_SCREENSHOTS=1`, saves it as
    /// docs/console/`name`.png (the README's pictures; without the variable a test run leaves
    /// the working tree as it was).
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if std::env::var_os("WAGATE_TEST_SCREENSHOTS").is_none() {
            return;
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&dir).expect("docs/console");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }
}

/// An XPath string literal of `s` (which holds no `'`).
fn quote(s: &str) -> String {
    assert!(!s.contains('\''), "{s:?}");
    format!("'{s}'")
}
