use super::*;
use crate::operator::crd::remote_cluster::{RemoteClusterSpec, RemoteClusterStatus};

fn entry(id: &str, tunnels: u32, connection: Connection) -> ProxyHolding {
    ProxyHolding {
        proxy_id: id.into(),
        connection,
        tunnels,
        since: Some("2026-12-01T00:00:00Z".into()),
        agents: Vec::new(),
        refused: None,
    }
}

fn remote(name: &str, entries: Vec<ProxyHolding>) -> Arc<RemoteCluster> {
    let mut rc = RemoteCluster::new(
        name,
        RemoteClusterSpec {
            ca_keys: vec!["ssh-ed25519 AAAA".into()],
            join_token: None,
        },
    );
    rc.status = Some(RemoteClusterStatus {
        proxies: entries,
        ..Default::default()
    });
    Arc::new(rc)
}

fn desired(entries: &[(&str, ProxyHolding)]) -> BTreeMap<String, ProxyHolding> {
    entries
        .iter()
        .map(|(leaf, e)| {
            (
                (*leaf).to_owned(),
                ProxyHolding {
                    since: None,
                    ..e.clone()
                },
            )
        })
        .collect()
}

#[test]
fn a_steady_root_plans_no_writes() {
    // The storm of issue #12: a leaf both written and held was visited twice, and the second
    // visit removed the entry the first had kept. Held and written alike: nothing to do.
    let a = entry("p1", 1, Connection::Online);
    let b = entry("p1", 3, Connection::Online);
    let remotes = vec![
        remote(
            "leaf-a",
            vec![a.clone(), entry("p2", 1, Connection::Online)],
        ),
        remote("leaf-b", vec![b.clone()]),
        remote("leaf-c", vec![entry("p2", 1, Connection::Online)]),
    ];
    let want = desired(&[("leaf-a", a), ("leaf-b", b)]);
    let mut pending = BTreeMap::new();
    let now = Instant::now();
    for _ in 0..3 {
        assert!(plan(&remotes, "p1", &want, &mut pending, now).is_empty());
    }
}

#[test]
fn changes_are_written_once_and_the_store_is_believed_after_the_lag() {
    let t0 = Instant::now();
    let mut pending = BTreeMap::new();
    let before = vec![remote("leaf-a", vec![entry("p1", 1, Connection::Online)])];
    // A second tunnel: one write, stamped later.
    let two = entry("p1", 2, Connection::Online);
    let want = desired(&[("leaf-a", two.clone())]);
    let writes = plan(&before, "p1", &want, &mut pending, t0);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].0, "leaf-a");
    assert_eq!(writes[0].1.as_ref().map(|e| e.tunnels), Some(2));
    pending.insert(
        "leaf-a".into(),
        Pending {
            entry: writes[0].1.clone(),
            at: t0,
        },
    );
    // Woken again before the watch showed the write: not repeated.
    assert!(
        plan(
            &before,
            "p1",
            &want,
            &mut pending,
            t0 + Duration::from_secs(1)
        )
        .is_empty()
    );
    // The watch shows it: settled, and the pending write is forgotten.
    let after = vec![remote("leaf-a", vec![two])];
    assert!(
        plan(
            &after,
            "p1",
            &want,
            &mut pending,
            t0 + Duration::from_secs(1)
        )
        .is_empty()
    );
    assert!(pending.is_empty());
    // Someone removed it (a prune racing a restart): written again.
    let pruned = vec![remote("leaf-a", vec![])];
    let writes = plan(
        &pruned,
        "p1",
        &want,
        &mut pending,
        t0 + Duration::from_secs(2),
    );
    assert_eq!(writes.len(), 1);
}

#[test]
fn a_write_the_watch_never_shows_is_repeated_after_the_lag() {
    let t0 = Instant::now();
    let before = vec![remote("leaf-a", vec![])];
    let want = desired(&[("leaf-a", entry("p1", 1, Connection::Online))]);
    let mut pending = BTreeMap::from([(
        "leaf-a".to_owned(),
        Pending {
            entry: want.get("leaf-a").cloned(),
            at: t0,
        },
    )]);
    assert!(plan(&before, "p1", &want, &mut pending, t0 + STORE_LAG / 2).is_empty());
    assert_eq!(
        plan(&before, "p1", &want, &mut pending, t0 + STORE_LAG).len(),
        1
    );
}

#[test]
fn lost_tunnels_remove_the_entry_and_offline_is_a_change() {
    let t0 = Instant::now();
    let remotes = vec![
        remote("leaf-a", vec![entry("p1", 1, Connection::Online)]),
        remote("leaf-b", vec![entry("p1", 1, Connection::Online)]),
    ];
    let want = desired(&[("leaf-b", entry("p1", 1, Connection::Offline))]);
    let mut writes = plan(&remotes, "p1", &want, &mut BTreeMap::new(), t0);
    writes.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(writes[0], ("leaf-a".to_owned(), None));
    assert_eq!(writes[1].0, "leaf-b");
    assert_eq!(
        writes[1].1.as_ref().map(|e| e.connection),
        Some(Connection::Offline)
    );
    // A leaf trusted without a RemoteCluster (a static trust directory) has nowhere to go.
    let unknown = desired(&[("leaf-z", entry("p1", 1, Connection::Online))]);
    assert!(plan(&[], "p1", &unknown, &mut BTreeMap::new(), t0).is_empty());
}

#[test]
fn the_prune_patch_removes_only_replicas_not_live() {
    let rc = remote(
        "leaf-a",
        vec![
            entry("p1", 1, Connection::Online),
            entry("p2", 1, Connection::Online),
            entry("p3", 1, Connection::Online),
        ],
    );
    let live = vec!["p1".to_owned(), "p3".to_owned()];
    let patch = prune_patch(&rc, &live).expect("p2 is pruned");
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/status/proxies/1/proxyId", "value": "p2"},
            {"op": "remove", "path": "/status/proxies/1"},
        ])
    );
    let all = vec!["p1".to_owned(), "p2".to_owned(), "p3".to_owned()];
    assert_eq!(prune_patch(&rc, &all), None);
}
