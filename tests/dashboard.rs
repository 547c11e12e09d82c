//! The dashboard in a real headless browser (Chromium through chromedriver):
//! log in, ban from the form, see the client refused, unban, see it pass,
//! a ban reason holding markup shown as text, live decisions, and the
//! degraded state when Redis dies. Chromium and chromedriver must be
//! installed (`.ci/run` installs them); without them this test fails.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// Markup that would run if the page ever put a reason into HTML.
const HOSTILE_REASON: &str =
    "<script>window.__pwned=1</script><img src=x onerror=\"window.__pwned=2\"> scanner";

/// Generous enough for the test's own clients, tight enough to ban a
/// client that hammers it.
const RULES: &str =
    "[[rules]]\nname = \"per-ip\"\nkey = \"ip\"\nrate = 1\nper = \"1s\"\nburst = 5\n";
const BAN: &str = "[ban]\nenabled = true\nafter = 3\nwithin = \"10s\"\nduration = \"5m\"\nstatus = 403\nreconcile_interval = \"1h\"\n";

/// `chromedriver` on a free loopback port, killed with the test.
struct Chromedriver {
    port: u16,
    _proc: Proc,
}

impl Chromedriver {
    fn start() -> Chromedriver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver must be installed (apt-get install -y chromium chromium-driver): {e}")
            });
        let driver = Chromedriver {
            port,
            _proc: Proc::new(child),
        };
        wait_until("chromedriver to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        driver
    }
}

/// The Chromium binary chromedriver should drive.
fn chromium() -> String {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            let out = Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .ok()?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (out.status.success() && !path.is_empty()).then_some(path)
        })
        .expect("Chromium must be installed (apt-get install -y chromium chromium-driver)")
}

async fn browser(driver: &Chromedriver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium(),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--window-size=1280,1500",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session through chromedriver")
}

/// Polls `f` until it gives `Some`, or panics naming `what`.
async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The page re-renders its lists every few seconds, so an element found
/// a moment ago can be gone: each helper looks it up again and retries.
const TRIES: usize = 5;

async fn text(c: &Client, css: &str) -> String {
    for _ in 0..TRIES {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                return t;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    String::new()
}

async fn shown(c: &Client, css: &str) -> bool {
    for _ in 0..TRIES {
        match c.find(Locator::Css(css)).await {
            Ok(e) => {
                if let Ok(d) = e.is_displayed().await {
                    return d;
                }
            }
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn type_into(c: &Client, css: &str, value: &str) {
    let e = c.find(Locator::Css(css)).await.unwrap();
    e.clear().await.unwrap();
    e.send_keys(value).await.unwrap();
}

async fn click(c: &Client, css: &str) {
    let mut last = None;
    for _ in 0..TRIES {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(err) => last = Some(err.to_string()),
            },
            Err(err) => last = Some(err.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot click {css}: {last:?}");
}

/// Steady, bounded traffic from a few clients so the chart has something
/// to draw; stops when the flag drops or after a minute.
fn background_traffic(gw_url: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
            let ip = format!("192.0.2.{}", 10 + n % 16);
            let _ = get_as(&gw_url, &ip);
            n += 1;
            thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn operators_ban_and_unban_from_the_dashboard() {
    let (mut redis, up) = (RedisServer::start(), Upstream::start());
    let gw = Gateway::on(&redis, &up, RULES, BAN);
    let driver = Chromedriver::start();
    let profile = tempfile::tempdir().unwrap();

    // The page itself needs no token, holds no data, and forbids inline code.
    let page = get(&gw.admin_url("/dashboard"), &[]);
    assert_eq!(page.status, 200);
    let csp = page
        .header("content-security-policy")
        .unwrap_or("")
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(csp.contains("require-trusted-types-for 'script'"), "{csp}");
    assert!(!page.body.contains(ADMIN_TOKEN));

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = background_traffic(gw.url("/"), stop.clone());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = browser(&driver, profile.path()).await;
        c.goto(&gw.admin_url("/dashboard")).await.unwrap();

        // A wrong token is refused and shows nothing.
        eventually("the login form", Duration::from_secs(10), || async {
            shown(&c, "#token").await.then_some(())
        })
        .await;
        type_into(&c, "#token", "not-the-token").await;
        click(&c, "#login-button").await;
        let refused = eventually("the refusal", Duration::from_secs(10), || async {
            let t = text(&c, "#login-error").await;
            (!t.is_empty()).then_some(t)
        })
        .await;
        assert!(refused.contains("401"), "{refused}");
        assert!(!shown(&c, "#board").await);

        // The right one opens the board; the token never lands in the URL.
        type_into(&c, "#token", ADMIN_TOKEN).await;
        click(&c, "#login-button").await;
        eventually("the board", Duration::from_secs(10), || async {
            shown(&c, "#ban-form").await.then_some(())
        })
        .await;
        assert!(!c.current_url().await.unwrap().as_str().contains(ADMIN_TOKEN));
        eventually("the node's health", Duration::from_secs(10), || async {
            (text(&c, "#health").await == "Redis OK").then_some(())
        })
        .await;
        c.execute(
            "window.__violations = []; document.addEventListener('securitypolicyviolation', e => window.__violations.push(e.violatedDirective));",
            vec![],
        )
        .await
        .unwrap();

        // A client that hammers the gateway is banned by the limiter.
        let hammer = "198.51.100.23";
        let mut statuses = Vec::new();
        for _ in 0..12 {
            statuses.push(get_as(&gw.url("/"), hammer).status);
        }
        assert_eq!(statuses.last(), Some(&403), "{statuses:?}");

        // Ban a client from the form, with a reason full of markup.
        let client = "203.0.113.77";
        assert_eq!(get_as(&gw.url("/"), client).status, 200);
        type_into(&c, "#ban-subject", client).await;
        type_into(&c, "#ban-duration", "10m").await;
        type_into(&c, "#ban-reason", HOSTILE_REASON).await;
        click(&c, "#ban-button").await;
        let row = format!("#ban-rows tr[data-subject='{client}']");
        eventually("the new ban in the list", Duration::from_secs(10), || async {
            shown(&c, &row).await.then_some(())
        })
        .await;
        assert_eq!(text(&c, &format!("{row} td.reason")).await, HOSTILE_REASON);
        let r = get_as(&gw.url("/"), client);
        assert_eq!((r.status, r.json()["error"].clone()), (403, json!("banned")));
        let injected = c
            .find_all(Locator::Css("#ban-rows script, #ban-rows img, #audit-rows script, #audit-rows img"))
            .await
            .unwrap();
        assert!(injected.is_empty(), "markup from a reason became elements");

        // The automatic ban is listed as such, and both reach the audit log.
        let auto_row = format!("#ban-rows tr[data-subject='{hammer}']");
        eventually("the automatic ban in the list", Duration::from_secs(10), || async {
            shown(&c, &auto_row).await.then_some(())
        })
        .await;
        assert_eq!(text(&c, &format!("{auto_row} td.reason")).await, "rule per-ip");
        eventually("both bans in the audit log", Duration::from_secs(10), || async {
            let audit = text(&c, "#audit-rows").await;
            (audit.contains(HOSTILE_REASON) && audit.contains(hammer)).then_some(())
        })
        .await;

        // A runtime allowlist entry, added from its form.
        type_into(&c, "#allow-cidr", "10.20.0.0/16").await;
        click(&c, "#allow-button").await;
        let net = "#allow-rows tr[data-network='10.20.0.0/16']";
        eventually("the new allowlist entry", Duration::from_secs(10), || async {
            shown(&c, net).await.then_some(())
        })
        .await;
        assert!(text(&c, net).await.contains("runtime"));
        assert_eq!(gw.admin("GET", "/admin/allowlist", None).json()["runtime"], json!(["10.20.0.0/16"]));

        // Live decisions: the chart's legend counts what the gateway decided.
        let allowed = eventually("allowed requests in the legend", Duration::from_secs(10), || async {
            let t = text(&c, "#legend li[data-decision='allowed'] .total").await;
            let n: u64 = t.trim_start_matches("total ").parse().ok()?;
            (n > 0).then_some(n)
        })
        .await;
        assert!(allowed <= gw.requests_metric("per-ip", "allowed"));
        eventually("banned requests in the legend", Duration::from_secs(10), || async {
            let t = text(&c, "#legend li[data-decision='banned'] .total").await;
            (t != "total 0" && !t.is_empty()).then_some(())
        })
        .await;
        // A few more seconds of history make the chart worth a look.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let png = c.screenshot().await.unwrap();
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
        std::fs::write(&shot, png).unwrap();
        eprintln!("dashboard screenshot: {}", shot.display());

        click(&c, &format!("{net} button")).await;
        eventually("the allowlist entry to go", Duration::from_secs(10), || async {
            (!shown(&c, net).await).then_some(())
        })
        .await;
        assert_eq!(gw.admin("GET", "/admin/allowlist", None).json()["runtime"], json!([]));

        // Unban from the list: the client passes again.
        click(&c, &format!("{row} button.unban")).await;
        eventually("the ban to leave the list", Duration::from_secs(10), || async {
            (!shown(&c, &row).await).then_some(())
        })
        .await;
        let passed = eventually("the client to pass again", Duration::from_secs(5), || async {
            let r = get_as(&gw.url("/"), client);
            (r.status == 200).then_some(r.status)
        })
        .await;
        assert_eq!(passed, 200);
        assert!(text(&c, "#bans-msg").await.contains(client));

        let pwned = c.execute("return window.__pwned === undefined", vec![]).await.unwrap();
        assert_eq!(pwned, json!(true), "markup from a reason ran");
        let violations = c.execute("return window.__violations", vec![]).await.unwrap();
        assert_eq!(violations, json!([]), "the page broke its own policy");

        // Redis dies: the page says the node is degraded.
        redis.kill9();
        for i in 0..6 {
            get_as(&gw.url("/"), &format!("192.0.2.{}", 100 + i));
        }
        eventually("the degraded state", Duration::from_secs(10), || async {
            text(&c, "#health").await.starts_with("DEGRADED").then_some(())
        })
        .await;

        c.close().await.unwrap();
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
}
