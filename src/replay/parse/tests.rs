//! The log readers against lines of every format, good and bad.

use super::*;

const APACHE: &str = r#"203.0.113.7 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif?x=1 HTTP/1.0" 200 2326 "http://www.example.com/start.html" "Mozilla/4.08 [en] (Win98; I ;Nav)""#;

#[test]
fn combined_lines_give_client_time_method_and_path() {
    let r = combined(APACHE).expect("a combined line");
    assert_eq!(r.client, "203.0.113.7".parse::<IpAddr>().expect("ip"));
    assert_eq!(r.time_us, 971_211_336_000_000);
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, "/apache_pb.gif");
    assert_eq!(r.host, None);
    let v6 = r#"2001:db8::1 - - [10/Oct/2000:13:55:36 -0700] "POST http://api.example.com/login HTTP/1.1" 401 0 "-" "curl/8""#;
    let r = combined(v6).expect("an IPv6 line");
    assert_eq!(r.path, "/login");
    assert_eq!(r.host.as_deref(), Some("api.example.com"));
    let quoted =
        r#"198.51.100.1 - - [10/Oct/2000:13:55:36 -0700] "GET /a\"b HTTP/1.1" 200 1 "-" "-""#;
    assert_eq!(combined(quoted).expect("escaped quote").path, r#"/a\"b"#);
}

#[test]
fn malformed_combined_lines_say_what_is_wrong() {
    for (line, says) in [
        ("", "no fields"),
        ("garbage", "no fields"),
        (
            "example.com - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" 200 1",
            "not an IP address",
        ),
        (
            "203.0.113.7 - - 10/Oct/2000:13:55:36 -0700 \"GET / HTTP/1.1\" 200 1",
            "no [time]",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700 \"GET / HTTP/1.1\" 200 1",
            "not closed",
        ),
        (
            "203.0.113.7 - - [yesterday] \"GET / HTTP/1.1\" 200 1",
            "is not dd/Mon",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] GET / HTTP/1.1 200 1",
            "no quoted",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1",
            "not closed",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"-\" 400 0",
            "not METHOD TARGET",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"\\x16\\x03 / x\" 400 0",
            "not a method",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\" ok 1",
            "three-digit",
        ),
        (
            "203.0.113.7 - - [10/Oct/2000:13:55:36 -0700] \"GET / HTTP/1.1\"",
            "three-digit",
        ),
    ] {
        let e = combined(line).expect_err(line);
        assert!(e.contains(says), "{line}: {e}");
    }
}

#[test]
fn json_lines_default_to_floodgates_own_fields() {
    let line = r#"{"time":"2026-05-01T12:00:00.250Z","client":"203.0.113.7","method":"GET","host":"api.example.com","path":"/v1/a?b=1","status":200,"decision":"allowed","rule":null,"bytes":3,"duration_ms":12.5,"keys":{"x-api-key":"abc"}}"#;
    let r = json(line, &JsonFields::default()).expect("a floodgate line");
    assert_eq!(r.time_us, 1_777_636_800_250_000);
    assert_eq!(r.path, "/v1/a");
    assert_eq!(r.host.as_deref(), Some("api.example.com"));
    assert_eq!(r.duration_us, Some(12_500));
    assert_eq!(
        r.keys,
        vec![(HeaderName::from_static("x-api-key"), "abc".into())]
    );
    assert!(!r.rejected);
    let rejected = line.replace("\"allowed\"", "\"rejected\"");
    assert!(
        json(&rejected, &JsonFields::default())
            .expect("a line")
            .rejected
    );
    // Screened before identity: no client, and still only skipped.
    let screened = r#"{"time":"2026-05-01T12:00:00.250Z","client":null,"method":"CONNECT","host":"","path":"x:443","status":405,"decision":"rejected"}"#;
    assert!(
        json(screened, &JsonFields::default())
            .expect("a line")
            .rejected
    );
}

#[test]
fn json_field_names_are_configurable() {
    let mut f = JsonFields::default();
    for spec in [
        "time=ts",
        "client=remote_addr",
        "request=req",
        "key:x-api-key=key_sha",
    ] {
        f.set(spec).expect(spec);
    }
    let line = r#"{"ts":1777636800.25,"remote_addr":"2001:db8::7","req":"POST /login HTTP/2.0","key_sha":"h","ua":{"deep":[1,2]}}"#;
    let r = json(line, &f).expect("an nginx json line");
    assert_eq!(r.time_us, 1_777_636_800_250_000);
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/login");
    assert_eq!(
        r.keys,
        vec![(HeaderName::from_static("x-api-key"), "h".into())]
    );
    for bad in ["time", "when=ts", "time=", "key:bad header=x"] {
        assert!(f.set(bad).is_err(), "{bad}");
    }
}

#[test]
fn malformed_json_lines_say_what_is_wrong() {
    let f = JsonFields::default();
    for (line, says) in [
        ("{", "not a JSON object"),
        ("[1,2]", "not a JSON object"),
        ("{} trailing", "not a JSON object"),
        (
            r#"{"client":"203.0.113.7","method":"GET","path":"/"}"#,
            "no `time`",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","method":"GET","path":"/"}"#,
            "no `client`",
        ),
        (
            r#"{"time":"yesterday","client":"203.0.113.7","method":"GET","path":"/"}"#,
            "not RFC 3339",
        ),
        (
            r#"{"time":-5,"client":"203.0.113.7","method":"GET","path":"/"}"#,
            "seconds since 1970",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","client":"nobody","method":"GET","path":"/"}"#,
            "not an IP",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7"}"#,
            "nor a `request`",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","client":7,"method":"GET","path":"/"}"#,
            "not a JSON object",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7","method":"GET","path":"/","keys":{"bad name":"h"}}"#,
            "not a header name",
        ),
        (
            r#"{"time":"2026-05-01T12:00:00Z","client":"203.0.113.7","method":"GET","path":"/","duration_ms":-1}"#,
            "milliseconds",
        ),
    ] {
        let e = json(line, &f).expect_err(line);
        assert!(e.contains(says), "{line}: {e}");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// No line panics a reader: anything, or a real line with bytes
    /// cut out or put in anywhere.
    #[test]
    fn no_line_panics(
        junk in ".{0,200}",
        at in 0usize..400,
        cut in 0usize..40,
        insert in ".{0,8}",
    ) {
        let f = JsonFields::default();
        let _ = combined(&junk);
        let _ = json(&junk, &f);
        let _ = time::rfc3339(&junk);
        let _ = time::clf(&junk);
        let real = [APACHE.to_string(), r#"{"time":"2026-05-01T12:00:00.250+02:00","client":"2001:db8::1","method":"GET","path":"/a","keys":{"x":"h"},"duration_ms":1}"#.to_string()];
        for line in real {
            let mut chars: Vec<char> = line.chars().collect();
            let at = at.min(chars.len());
            let end = (at + cut).min(chars.len());
            chars.splice(at..end, insert.chars());
            let mutated: String = chars.into_iter().collect();
            let _ = combined(&mutated);
            let _ = json(&mutated, &f);
        }
    }
}
