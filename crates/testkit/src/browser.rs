//! Headless Chromium driven over the DevTools protocol, for tests of the pages Netbore
//! serves (the agent's inspector, control's dashboard). `.ci/run` installs Debian's
//! `chromium`; without it these tests fail and say how to install it.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// How long one DevTools call, or one [`Browser::wait`], may take.
const WAIT: Duration = Duration::from_secs(30);

/// Headless Chromium driven over the DevTools protocol (one WebSocket, one page).
pub struct Browser {
    child: tokio::process::Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a fresh profile and attaches to a blank page.
    pub async fn launch() -> Browser {
        use tokio::io::AsyncBufReadExt;
        let chromium = [
            "/usr/bin/chromium",
            "/usr/bin/chromium-browser",
            "/usr/bin/google-chrome",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("no Chromium found: install it (Debian: apt-get install chromium)");
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1400,900",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = tokio::time::timeout(WAIT, async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(u) = l.strip_prefix("DevTools listening on ") {
                    return u.trim().to_string();
                }
            }
            panic!("chromium exited before listening for DevTools")
        })
        .await
        .expect("chromium's DevTools address within the limit");
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .unwrap();
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next: 0,
            _profile: profile,
        };
        let t = b
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target = t["targetId"].as_str().unwrap().to_string();
        let a = b
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        b.session = a["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// Calls a DevTools method on the page; its result (an error fails the test).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let v = self.send(method, params).await;
        assert!(v.get("error").is_none(), "{method}: {v}");
        v["result"].clone()
    }

    /// Sends a DevTools call; the whole answer (`result` or `error`).
    async fn send(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        tokio::time::timeout(WAIT, async {
            while let Some(m) = self.ws.next().await {
                if let Ok(Message::Text(t)) = m {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["id"] == id {
                        return v;
                    }
                }
            }
            panic!("DevTools connection closed")
        })
        .await
        .expect("DevTools answers within the limit")
    }

    /// Navigates to `url`.
    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
    }

    /// Evaluates `expr` in the page (promises awaited): its value, or the error or
    /// exception (e.g. while the page navigates).
    pub async fn try_eval(&mut self, expr: &str) -> Result<Value, Value> {
        let v = self
            .send(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = v.get("error") {
            return Err(e.clone());
        }
        let r = &v["result"];
        if let Some(e) = r.get("exceptionDetails") {
            return Err(e.clone());
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `expr` in the page (promises awaited), its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        self.try_eval(expr)
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// Waits (at most 30 s) until `expr` is truthy; its value. An evaluation that
    /// throws counts as not yet (a page that reloads itself is briefly gone).
    pub async fn wait(&mut self, expr: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.try_eval(expr).await;
            if let Ok(v) = &v
                && !(v.is_null() || *v == json!(false) || *v == json!("") || *v == json!(0))
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "never true in the page: {expr} (last: {v:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page as `docs/img/NAME` (screenshots the docs use).
    pub async fn screenshot(&mut self, name: &str) {
        use base64::Engine;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/img");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
