//! Allow-list rules, as an agent reads them from its configuration (a leaf administrator's
//! text, but also what a compromised config source could hand it).
//!
//! Invariants: a parsed rule prints as text that parses back to the same rule (so status
//! reports show exactly what is enforced); the serde path agrees with `FromStr`; a name rule
//! permits its own name on its own ports and never port 0; never-allowed addresses stay denied
//! whatever the rule.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use tether::egress::allow_list::{AllowList, Rule, never_allowed_reason};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.split('\n') {
        check_rule(line);
    }
    let list = AllowList::parse(text.split('\n'));
    if let Ok(list) = list {
        let json = serde_json::to_string(&list).expect("a list serialises");
        let again: AllowList = serde_json::from_str(&json).expect("a serialised list parses");
        assert_eq!(again, list);
        for ip in [
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::BROADCAST),
            IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6("::ffff:0.0.0.0".parse().expect("literal")),
            IpAddr::V6("ff02::1".parse().expect("literal")),
        ] {
            assert!(never_allowed_reason(ip).is_some());
            assert!(!list.permits_ip(ip, 80), "{ip} permitted by {json}");
        }
    }
});

fn check_rule(text: &str) {
    let parsed = text.parse::<Rule>();
    let json = serde_json::to_string(text).expect("a string serialises");
    let via_serde = serde_json::from_str::<Rule>(&json);
    assert_eq!(parsed.is_ok(), via_serde.is_ok());
    let Ok(rule) = parsed else {
        return;
    };
    let printed = rule.to_string();
    let again = printed
        .parse::<Rule>()
        .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which fails: {e}"));
    assert_eq!(again, rule, "{text:?} printed as {printed:?}");

    let list = AllowList::parse([printed.as_str()]).expect("one valid rule");
    assert!(!list.permits_name("a.b", 0));
    // `HOST:PORTS`: a name rule (not an address, not a wildcard) permits its own name.
    let (host, ports) = printed.rsplit_once(':').expect("a rule prints HOST:PORTS");
    if host.starts_with('[') || host.starts_with('*') || host.parse::<IpAddr>().is_ok() {
        return;
    }
    if host.contains('/') {
        return;
    }
    let first_port = match ports {
        "*" => 443,
        list => list
            .split([',', '-'])
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("a printed port list starts with a port"),
    };
    assert!(
        list.permits_name(host, first_port),
        "{printed:?} does not permit {host}:{first_port}"
    );
    assert!(list.permits_name(&host.to_ascii_uppercase(), first_port));
}
