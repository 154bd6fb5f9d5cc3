//! The leaf chosen in the user name (`alice@leaf-1`) with the real host as the target.

use super::*;

/// `Basic base64(user:token)`.
fn basic(user: &str, token: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    format!("Basic {encoded}")
}

/// The last target the entry dialled, and for whom.
fn last_dialled(entry: &Entry) -> (String, Target) {
    entry
        .dialer
        .dialled
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a dial")
}

#[tokio::test]
async fn http_real_host_with_the_leaf_in_the_user_name() {
    let entry = start(config()).await;
    for (authority, endpoint) in [
        (
            "web.internal:443",
            Endpoint::host("web.internal", 443).unwrap(),
        ),
        ("10.0.0.5:8443", Endpoint::host("10.0.0.5", 8443).unwrap()),
        ("[fd00::1]:22", Endpoint::host("fd00::1", 22).unwrap()),
        ("web.leaf-1.tether:80", Endpoint::host("web", 80).unwrap()),
    ] {
        let auth = basic("alice@leaf-1", ALICE);
        let mut s = connect_request(&entry, authority, Some(&auth)).await;
        assert_eq!(read_exact_n(&mut s, ESTABLISHED.len()).await, ESTABLISHED);
        assert_echoes(&mut s, b"through leaf-1").await;
        let (user, target) = last_dialled(&entry);
        assert_eq!(user, "alice", "the token was checked for alice");
        assert_eq!(target.cluster.as_str(), "leaf-1", "{authority}");
        assert_eq!(target.endpoint, endpoint, "{authority}");
    }
}

#[tokio::test]
async fn http_leaf_choices_that_cannot_work_are_explained() {
    let entry = start(config()).await;
    for (user, authority, says) in [
        ("alice", "web.internal:443", "names no cluster"),
        ("alice@Leaf_1", "web.internal:443", "invalid cluster name"),
        (
            "alice@leaf-2",
            "web.leaf-1.tether:80",
            "is in cluster leaf-1",
        ),
    ] {
        let auth = basic(user, ALICE);
        let mut s = connect_request(&entry, authority, Some(&auth)).await;
        let response = read_all(&mut s).await;
        assert!(
            response.starts_with("HTTP/1.1 400 "),
            "{user} {authority}: {response}"
        );
        assert!(response.contains(says), "{user} {authority}: {response}");
    }
    // A Bearer token has no user name: a real host names no cluster.
    let bearer = format!("Bearer {ALICE}");
    let mut s = connect_request(&entry, "web.internal:443", Some(&bearer)).await;
    let response = read_all(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert!(response.contains("Bearer"), "{response}");
    // The token is checked for the user before the @: bob's token is not alice's.
    let mut s = connect_request(
        &entry,
        "web.internal:443",
        Some(&basic("alice@leaf-1", BOB)),
    )
    .await;
    assert!(read_all(&mut s).await.starts_with("HTTP/1.1 407 "));
    assert!(
        entry.dialer.dialled.lock().unwrap().is_empty(),
        "nothing was dialled"
    );
}

#[tokio::test]
async fn the_access_rules_judge_the_leaf_of_the_user_name() {
    let entry = start(config()).await;
    let mut s = connect_request(&entry, "web.internal:443", Some(&basic("bob@private", BOB))).await;
    let response = read_all(&mut s).await;
    assert!(response.starts_with("HTTP/1.1 403 "), "{response}");
    assert!(
        response.contains("bob may not dial leaf private"),
        "{response}"
    );
    let (mut s, reply) =
        socks_request_as(&entry, "bob@private", BOB, &domain("web.internal"), 1).await;
    assert_eq!(reply[..2], [5, 0x02], "not allowed by ruleset");
    assert_closed(&mut s).await;
    let auth = basic("alice@private", ALICE);
    let mut s = connect_request(&entry, "web.internal:443", Some(&auth)).await;
    assert_eq!(read_exact_n(&mut s, ESTABLISHED.len()).await, ESTABLISHED);
}

#[tokio::test]
async fn socks_real_host_and_ip_with_the_leaf_in_the_user_name() {
    let entry = start(config()).await;
    let mut ipv6 = vec![4];
    ipv6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    for (address, host) in [
        (domain("web.internal"), "web.internal"),
        (vec![1, 10, 0, 0, 5], "10.0.0.5"),
        (ipv6, "fd00::1"),
    ] {
        let (mut s, reply) = socks_request_as(&entry, "alice@leaf-1", ALICE, &address, 1).await;
        assert_eq!(reply[..2], [5, 0], "{host}");
        assert_echoes(&mut s, b"ping").await;
        let (user, target) = last_dialled(&entry);
        assert_eq!(
            (user.as_str(), target.cluster.as_str()),
            ("alice", "leaf-1")
        );
        assert_eq!(target.endpoint, Endpoint::host(host, 22).unwrap());
    }
    // Without a leaf, a real host or an IP still names no cluster.
    for (address, code) in [(domain("web.internal"), 0x04), (vec![1, 10, 0, 0, 5], 0x08)] {
        let (mut s, reply) = socks_request(&entry, ALICE, &address, 1).await;
        assert_eq!(reply[..2], [5, code], "{address:?}");
        assert_closed(&mut s).await;
    }
    let (_, reply) = socks_request_as(
        &entry,
        "alice@leaf-2",
        ALICE,
        &domain("web.leaf-1.tether"),
        1,
    )
    .await;
    assert_eq!(reply[..2], [5, 0x04], "the two clusters disagree");
}
