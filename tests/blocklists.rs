//! `[[blocklists]]`: files of addresses and networks (Spamhaus DROP and
//! FireHOL formats) whose clients get the ban answer; re-read when the file
//! changes and on reload; the last good content kept when the file cannot
//! be read; bad lines counted and skipped; a million lines in bounds.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const LIST: &str = "; Spamhaus DROP List 2026/12/06\n\
203.0.113.0/24 ; SBL000001\n\
# FireHOL netset\n\
198.51.100.7\n\
not-an-address\n\
2001:db8::/32\n\
10.9.9.9/33\n\
192.0.2.77\n";

fn list_section(path: &Path, extra: &str) -> String {
    format!(
        "[[blocklists]]\npath = \"{}\"\npoll = \"1s\"\n{extra}\n",
        path.display()
    )
}

fn start(redis: &RedisServer, up: &Upstream, lists: &str) -> Gateway {
    Gateway::on(
        redis,
        up,
        "",
        &format!("[ban]\nenabled = false\nallowlist = [\"192.0.2.77/32\"]\n\n{lists}"),
    )
}

fn refused(gw: &Gateway, ip: &str) -> bool {
    get_as(&gw.url("/"), ip).status != 200
}

#[test]
fn listed_clients_get_the_ban_answer_and_bad_lines_are_skipped() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let drop = write_file(dir.path(), "drop.txt", LIST);
    let gw = start(&redis, &up, &list_section(&drop, "status = 403"));

    let r = get_as(&gw.url("/"), "203.0.113.9");
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert_eq!(r.json()["error"], "banned");
    assert!(refused(&gw, "198.51.100.7"));
    assert!(refused(&gw, "2001:db8:1::5"));
    assert!(!refused(&gw, "198.51.100.8"));
    assert!(!refused(&gw, "2001:db9::1"));
    // The allowlist wins over a list.
    assert!(!refused(&gw, "192.0.2.77"));

    assert_eq!(
        gw.metric("floodgate_blocklist_hits_total{list=\"drop.txt\"}"),
        3.0
    );
    assert_eq!(
        gw.metric("floodgate_blocklist_entries{list=\"drop.txt\"}"),
        4.0
    );
    assert_eq!(
        gw.metric("floodgate_blocklist_bad_lines{list=\"drop.txt\"}"),
        2.0
    );
    assert_eq!(gw.requests_metric("-", "banned"), 3);
    assert!(
        gw.log()
            .contains("2 lines skipped as not an address or network (lines 5, 7)"),
        "{}",
        gw.log()
    );
}

#[test]
fn a_changed_file_is_read_again_and_an_unreadable_one_keeps_its_last_content() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let drop = write_file(dir.path(), "drop.txt", LIST);
    let gw = start(&redis, &up, &list_section(&drop, ""));
    // Without a status of its own, the list answers with ban.status.
    assert_eq!(get_as(&gw.url("/"), "198.51.100.7").status, 429);
    assert!(!refused(&gw, "192.0.2.1"));

    // Replaced (as feeds are: a new file renamed over the old one).
    let next = write_file(dir.path(), "drop.new", "192.0.2.1\n");
    std::fs::rename(&next, &drop).unwrap();
    wait_until("the new content", Duration::from_secs(5), || {
        refused(&gw, "192.0.2.1")
    });
    assert!(!refused(&gw, "198.51.100.7"));

    // Gone: the last good content stays, counted and logged once.
    std::fs::remove_file(&drop).unwrap();
    wait_until("the failure seen", Duration::from_secs(5), || {
        gw.metric("floodgate_blocklist_stale{list=\"drop.txt\"}") == 1.0
    });
    std::thread::sleep(Duration::from_millis(2500));
    assert!(refused(&gw, "192.0.2.1"));
    assert_eq!(
        gw.log().matches("keeping its last good content").count(),
        1,
        "{}",
        gw.log()
    );
    assert!(
        gw.metric("floodgate_blocklist_reads_total{list=\"drop.txt\",result=\"error\"}") >= 2.0
    );

    // Back: read again.
    write_file(dir.path(), "drop.txt", "198.51.100.7\n");
    wait_until("the file back", Duration::from_secs(5), || {
        gw.metric("floodgate_blocklist_stale{list=\"drop.txt\"}") == 0.0
    });
    assert!(refused(&gw, "198.51.100.7"));
    assert!(!refused(&gw, "192.0.2.1"));
    assert!(gw.log().contains("read again"));
}

#[test]
fn a_reload_adds_lists_relative_to_the_config_file_and_refuses_a_missing_one() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let mut gw = start(&redis, &up, "");
    assert!(!refused(&gw, "198.51.100.7"));
    let config_dir = gw.config_path().parent().unwrap().to_path_buf();

    // A list that does not exist: the reload is refused, naming the key.
    let missing = format!(
        "{}\n[[blocklists]]\npath = \"nowhere.txt\"\n",
        gw.config_text()
    );
    gw.write_config(&missing);
    let r = gw.admin("POST", "/admin/reload", None);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("blocklists[0].path"), "{}", r.body);

    write_file(&config_dir, "own.list", "198.51.100.0/28\n");
    let text = format!(
        "{}\n[[blocklists]]\npath = \"own.list\"\nretry_after = \"10m\"\n",
        gw.config_text().split("\n[[blocklists]]").next().unwrap()
    );
    gw.write_config(&text);
    let r = gw.admin("POST", "/admin/reload", None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until("the list read", Duration::from_secs(5), || {
        refused(&gw, "198.51.100.7")
    });
    assert_eq!(
        get_as(&gw.url("/"), "198.51.100.7").header("retry-after"),
        Some("600")
    );
    assert!(!refused(&gw, "198.51.100.16"));
}

#[test]
fn a_million_line_list_loads_in_bounds() {
    let (redis, up) = (RedisServer::start(), Upstream::start());
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::with_capacity(20 << 20);
    // 1 000 000 distinct networks: /32s and /24s spread over 10.0.0.0/8
    // and 100.64.0.0/10, with a bad line every 100 000.
    for i in 0u32..1_000_000 {
        if i % 100_000 == 99_999 {
            text.push_str("garbage\n");
            continue;
        }
        let a = 0x0a00_0000u32 + i * 13;
        if i % 2 == 0 {
            let ip = std::net::Ipv4Addr::from(a);
            text.push_str(&format!("{ip}\n"));
        } else {
            let ip = std::net::Ipv4Addr::from(0x6440_0000u32 + (i << 8) % (1 << 22));
            text.push_str(&format!("{ip}/24 ; SBL{i}\n"));
        }
    }
    // Started on a small list, then given the big one the way feeds
    // arrive (renamed over it): the read is measured on its own.
    let path = write_file(dir.path(), "big.txt", "192.0.2.1\n");
    let gw = start(&redis, &up, &list_section(&path, ""));
    let rss_before = gw.rss_kib();
    let next = write_file(dir.path(), "big.new", &text);
    let started = Instant::now();
    std::fs::rename(&next, &path).unwrap();
    wait_until("the big list read", Duration::from_secs(120), || {
        gw.metric("floodgate_blocklist_entries{list=\"big.txt\"}") == 999_990.0
    });
    let took = started.elapsed();
    assert_eq!(
        gw.metric("floodgate_blocklist_entries{list=\"big.txt\"}"),
        999_990.0
    );
    assert_eq!(
        gw.metric("floodgate_blocklist_bad_lines{list=\"big.txt\"}"),
        10.0
    );
    assert!(refused(&gw, "10.0.0.26"));
    assert!(!refused(&gw, "10.0.0.27"));
    assert!(refused(&gw, "100.64.1.200"));
    let rss_mib = gw.rss_kib() / 1024;
    let grown = gw.rss_kib().saturating_sub(rss_before) / 1024;
    eprintln!("1M-line list: read within {took:?}, resident {rss_mib} MiB (+{grown} MiB)");
    assert!(grown < 150, "resident +{grown} MiB");
}
