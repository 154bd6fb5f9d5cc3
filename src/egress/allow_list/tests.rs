use super::*;

fn list(rules: &[&str]) -> AllowList {
    match AllowList::parse(rules) {
        Ok(list) => list,
        Err(err) => panic!("{err}"),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn parse_err(rule: &str) -> AllowListError {
    match rule.parse::<Rule>() {
        Ok(parsed) => panic!("{rule:?} parsed as {parsed}"),
        Err(err) => err,
    }
}

#[test]
fn round_trips() {
    for rule in [
        "10.0.0.0/8:80,443,8000-8100",
        "192.168.1.5:22",
        "[fd00::/8]:443",
        "[::1]:22",
        "db.internal:5432",
        "*.svc.cluster.local:*",
        "0.0.0.0/0:1-65535",
        "_http._tcp.example.com:80",
    ] {
        let parsed: Rule = rule.parse().expect(rule);
        assert_eq!(parsed.to_string(), rule);
        assert_eq!(parsed.to_string().parse::<Rule>(), Ok(parsed));
    }
}

#[test]
fn normalises_on_parse() {
    let cases = [
        ("DB.Internal.:5432", "db.internal:5432"),
        ("192.168.1.5/32:22", "192.168.1.5:22"),
        ("[::1/128]:22", "[::1]:22"),
        (" 10.0.0.0/8 : 80 , 443 ", "10.0.0.0/8:80,443"),
        ("*.Example.COM.:8000-8000", "*.example.com:8000"),
    ];
    for (rule, shown) in cases {
        let parsed: Rule = rule.trim().parse().expect(rule);
        assert_eq!(parsed.to_string(), shown);
    }
}

#[test]
fn serde_as_strings() {
    let list = list(&["10.0.0.0/8:80", "*.svc:*"]);
    let json = serde_json::to_string(&list).expect("serialise");
    assert_eq!(json, r#"["10.0.0.0/8:80","*.svc:*"]"#);
    let back: AllowList = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, list);
    let bad = serde_json::from_str::<AllowList>(r#"["10.0.0.0/8:0"]"#);
    let err = bad.expect_err("port 0").to_string();
    assert!(err.contains("port 0"), "{err}");
}

#[test]
fn parse_errors_quote_the_rule_and_say_why() {
    let cases = [
        ("", "empty rule"),
        ("10.0.0.1", "missing ':PORTS'"),
        ("10.0.0.1:", "no ports"),
        (":80", "no host"),
        ("fd00::1:80", "in brackets"),
        ("[fd00::1:80", "matching ']'"),
        ("[fd00::1]80", "expected ':PORTS'"),
        ("[10.0.0.1]:80", "not an IPv6 address"),
        ("[fd00::/129]:80", "not an IPv6 network"),
        ("[fd00::1/8]:80", "host bits set"),
        ("[::ffff:127.0.0.1]:80", "judged as IPv4"),
        ("[::ffff:0:0/96]:80", "judged as IPv4"),
        ("10.0.0.0/33:80", "not an IPv4 network"),
        ("10.0.0.1/8:80", "did you mean 10.0.0.0/8"),
        ("*:80", "'*' alone"),
        ("a.*.com:80", "whole first label"),
        ("*foo.com:80", "whole first label"),
        ("bad host:80", "not a valid host name"),
        ("a..b:80", "not a valid host name"),
        ("127.1:80", "ambiguous numeric"),
        ("0x7f.0.0.1:80", "ambiguous numeric"),
        ("host:0", "port 0"),
        ("host:65536", "out of range"),
        ("host:http", "not a port number"),
        ("host:-5", "not a port number"),
        ("host:90-80", "runs backwards"),
        ("host:80,,81", "empty entry"),
        ("host:80,*", "whole port list"),
    ];
    for (rule, why) in cases {
        let err = parse_err(rule);
        assert_eq!(err.rule, rule);
        let text = err.to_string();
        assert!(text.contains(&format!("{rule:?}")), "{text}");
        assert!(text.contains(why), "{rule:?}: {text}");
    }
    let err = AllowList::parse(["10.0.0.0/8:80", "nope"]).expect_err("second rule");
    assert_eq!(err.rule, "nope");
}

#[test]
fn default_denies_everything() {
    let empty = AllowList::default();
    assert!(empty.is_empty());
    assert!(empty.rules().is_empty());
    assert!(!empty.permits_ip(ip("127.0.0.1"), 80));
    assert!(!empty.permits_name("localhost", 80));
    assert!(!empty.has_ip_rule_for_port(80));
}

#[test]
fn ip_rules_and_ports() {
    let list = list(&[
        "10.0.0.0/8:80,443,8000-8100",
        "192.168.1.5:22",
        "[fd00::/8]:*",
    ]);
    assert!(!list.is_empty());
    assert_eq!(list.rules().len(), 3);
    assert!(list.permits_ip(ip("10.1.2.3"), 80));
    assert!(list.permits_ip(ip("10.255.255.255"), 8000));
    assert!(list.permits_ip(ip("10.0.0.1"), 8100));
    assert!(!list.permits_ip(ip("10.0.0.1"), 7999));
    assert!(!list.permits_ip(ip("10.0.0.1"), 8101));
    assert!(!list.permits_ip(ip("11.0.0.1"), 80));
    assert!(list.permits_ip(ip("192.168.1.5"), 22));
    assert!(!list.permits_ip(ip("192.168.1.6"), 22));
    assert!(!list.permits_ip(ip("192.168.1.5"), 23));
    assert!(list.permits_ip(ip("fd12::1"), 65535));
    assert!(!list.permits_ip(ip("fd12::1"), 0));
    assert!(!list.permits_ip(ip("fe80::1"), 443));
    // Name rules never match addresses and vice versa.
    assert!(!list.permits_name("10.1.2.3", 80));
}

#[test]
fn never_allowed_addresses() {
    let list = list(&["0.0.0.0/0:*", "[::/0]:*"]);
    for never in [
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "255.255.255.255",
        "224.0.0.1",
        "239.1.2.3",
        "ff02::1",
        "::ffff:0.0.0.0",
        "::ffff:255.255.255.255",
        "::ffff:224.0.0.1",
    ] {
        assert!(!list.permits_ip(ip(never), 80), "{never}");
        assert!(never_allowed_reason(ip(never)).is_some(), "{never}");
    }
    // Catch-all networks do not name loopback or link-local addresses.
    assert!(!list.permits_ip(ip("127.0.0.1"), 80));
    assert!(!list.permits_ip(ip("::1"), 80));
    assert!(!list.permits_ip(ip("169.254.169.254"), 80));
    assert!(list.permits_ip(ip("8.8.8.8"), 80));
    assert!(list.permits_ip(ip("2001:db8::1"), 80));
}

#[test]
fn nat64_forms_of_never_allowed_addresses() {
    let list = list(&["[64:ff9b::/96]:*"]);
    for never in ["64:ff9b::", "64:ff9b::e000:1", "64:ff9b::ffff:ffff"] {
        assert!(never_allowed_reason(ip(never)).is_some(), "{never}");
        assert!(!list.permits_ip(ip(never), 80), "{never}");
    }
    assert!(list.permits_ip(ip("64:ff9b::808:808"), 80));
}

/// Every form of a loopback or link-local address, and the range it is judged in.
const RESTRICTED: [(&str, &str); 14] = [
    ("127.0.0.1", "127.0.0.0/8"),
    ("127.255.255.254", "127.0.0.0/8"),
    ("::ffff:127.0.0.1", "127.0.0.0/8"),
    ("::127.0.0.1", "127.0.0.0/8"),
    ("64:ff9b::7f00:1", "64:ff9b::7f00:0/104"),
    ("169.254.169.254", "169.254.0.0/16"),
    ("169.254.0.1", "169.254.0.0/16"),
    ("::ffff:169.254.169.254", "169.254.0.0/16"),
    ("::169.254.169.254", "169.254.0.0/16"),
    ("64:ff9b::a9fe:a9fe", "64:ff9b::a9fe:0/112"),
    ("::1", "::1/128"),
    ("fe80::1", "fe80::/10"),
    ("febf:ffff::1", "fe80::/10"),
    ("fe80::a9fe:a9fe", "fe80::/10"),
];

#[test]
fn restricted_ranges() {
    for (addr, range) in RESTRICTED {
        let found = restricted_range(ip(addr)).unwrap_or_else(|| panic!("{addr}"));
        assert_eq!(found.net.to_string(), range, "{addr}");
        assert!(!reachable_through_names(ip(addr)), "{addr}");
    }
    for open in [
        "10.0.0.1",
        "126.255.255.255",
        "128.0.0.1",
        "169.253.255.255",
        "169.255.0.1",
        "fec0::1",
        "fd00::1",
        "64:ff9b::a00:1",
        "64:ff9b:1::7f00:1",
    ] {
        assert_eq!(restricted_range(ip(open)), None, "{open}");
        assert!(reachable_through_names(ip(open)), "{open}");
    }
    for never in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "::", "ff02::1"] {
        assert!(!reachable_through_names(ip(never)), "{never}");
    }
}

#[test]
fn restricted_addresses_need_a_rule_inside_their_range() {
    let broad = list(&[
        "0.0.0.0/0:*",
        "[::/0]:*",
        "64.0.0.0/2:*",
        "[64:ff9b::/96]:*",
        "[fe80::/9]:*",
        "169.0.0.0/8:*",
        "*.svc.cluster.local:*",
    ]);
    for (addr, _) in RESTRICTED {
        assert!(!broad.permits_ip(ip(addr), 80), "{addr}");
        assert!(!broad.permits_resolved(true, ip(addr), 80), "{addr}");
        assert!(!broad.permits_resolved(false, ip(addr), 80), "{addr}");
    }
    for (rules, allowed, refused) in [
        (&["127.0.0.1:80"][..], "127.0.0.1", "127.0.0.2"),
        (&["127.0.0.0/8:80"][..], "127.9.9.9", "169.254.169.254"),
        (
            &["169.254.169.254/32:80"][..],
            "169.254.169.254",
            "169.254.169.253",
        ),
        (&["[::1]:80"][..], "::1", "fe80::1"),
        (&["[fe80::/64]:80"][..], "fe80::1", "fe80:1::1"),
        (
            &["[64:ff9b::7f00:0/104]:80"][..],
            "64:ff9b::7f00:1",
            "127.0.0.1",
        ),
    ] {
        let list = list(rules);
        assert!(list.permits_ip(ip(allowed), 80), "{rules:?} {allowed}");
        assert!(list.permits_resolved(true, ip(allowed), 80), "{rules:?}");
        assert!(list.permits_resolved(false, ip(allowed), 80), "{rules:?}");
        assert!(!list.permits_ip(ip(allowed), 81), "{rules:?} port");
        assert!(!list.permits_ip(ip(refused), 80), "{rules:?} {refused}");
    }
}

#[test]
fn host_rules_vouch_only_for_unrestricted_answers() {
    let list = list(&["*.svc.cluster.local:*", "10.0.0.0/8:443"]);
    // A host rule permits any ordinary answer; an address rule only its own.
    assert!(list.permits_resolved(true, ip("192.168.1.1"), 80));
    assert!(list.permits_resolved(true, ip("fd00::1"), 80));
    assert!(!list.permits_resolved(false, ip("192.168.1.1"), 80));
    assert!(list.permits_resolved(false, ip("10.1.1.1"), 443));
    assert!(list.permits_resolved(true, ip("::ffff:10.1.1.1"), 443));
    for never in ["0.0.0.0", "255.255.255.255", "239.1.1.1", "::", "ff02::1"] {
        assert!(!list.permits_resolved(true, ip(never), 80), "{never}");
    }
}

#[test]
fn mapped_addresses_are_judged_as_ipv4() {
    assert_eq!(canonical_ip(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
    assert_eq!(canonical_ip(ip("::127.0.0.1")), ip("127.0.0.1"));
    assert_eq!(canonical_ip(ip("::1")), ip("::1"));
    assert_eq!(canonical_ip(ip("::")), ip("::"));
    assert_eq!(canonical_ip(ip("fd00::1")), ip("fd00::1"));

    let tens = list(&["10.0.0.0/8:*"]);
    assert!(!tens.permits_ip(ip("::ffff:127.0.0.1"), 80));
    assert!(tens.permits_ip(ip("::ffff:10.0.0.1"), 80));

    let loopback = list(&["127.0.0.1/32:80"]);
    assert!(loopback.permits_ip(ip("::ffff:127.0.0.1"), 80));
    assert!(loopback.permits_ip(ip("::127.0.0.1"), 80));
    assert!(!loopback.permits_ip(ip("::ffff:127.0.0.2"), 80));
    assert!(!loopback.permits_ip(ip("::1"), 80));

    // A v6 catch-all does not reach IPv4 through mapped addresses.
    let v6_only = list(&["[::/0]:*"]);
    assert!(!v6_only.permits_ip(ip("::ffff:127.0.0.1"), 80));
}

#[test]
fn name_rules() {
    let list = list(&["db.internal:5432", "*.svc.cluster.local:*", "*.invalid:80"]);
    assert!(list.permits_name("db.internal", 5432));
    assert!(list.permits_name("DB.Internal.", 5432));
    assert!(!list.permits_name("db.internal", 5433));
    assert!(!list.permits_name("x.db.internal", 5432));
    assert!(!list.permits_name("db.internal..", 5432));
    assert!(list.permits_name("api.default.svc.cluster.local", 443));
    assert!(list.permits_name("a.b.svc.cluster.local", 1));
    assert!(!list.permits_name("svc.cluster.local", 443));
    assert!(!list.permits_name("xsvc.cluster.local", 443));
    assert!(!list.permits_name(".svc.cluster.local", 443));
    assert!(!list.permits_name("a.svc.cluster.local", 0));
    assert!(list.permits_name("nonexistent.invalid", 80));
    assert!(!list.permits_name("nonexistent.invalid", 81));
    assert!(!list.permits_name("bad name.invalid", 80));
    assert!(!list.permits_ip(ip("10.0.0.1"), 5432));
    assert!(!list.has_ip_rule_for_port(5432));
}

#[test]
fn numeric_forms() {
    for numeric in [
        "2130706433",
        "0177.0.0.1",
        "0x7f.1",
        "0x7f.0.0.1",
        "127.1",
        "017700000001",
        "0x7F.0.1",
        "127.0.0.1.",
        "1.2.3.4.5",
    ] {
        assert!(is_numeric_host_form(numeric), "{numeric}");
    }
    for name in [
        "localhost",
        "1e100.net",
        "0x7f.example",
        "123.example.com",
        "",
    ] {
        assert!(!is_numeric_host_form(name), "{name}");
    }
}
