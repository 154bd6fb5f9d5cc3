//! One client cannot take a tunnel's whole stream budget: each SSH client identity holds at
//! most its share of open streams, and its share comes back as its streams end.

use std::time::Duration;

use tether::client::{ClientError, DialClient};
use tether::protocol::Target;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_more_than_its_share_of_streams() {
    let echo = echo_server().await.expect("echo");
    let share = 4;
    let rig = Rig::start(
        &[format!("127.0.0.1/32:{}", echo.port())],
        |proxy| proxy.limits.max_streams_per_client = share,
        |_| {},
    )
    .await;
    let target = Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("t");
    // The greedy client holds its share on one connection, and asks again on a second one:
    // the share is per identity, not per connection.
    let greedy = DialClient::connect(&client_config(&rig, &rig.pki.root, "greedy"))
        .await
        .expect("connects");
    let mut held = Vec::new();
    for _ in 0..share {
        held.push(
            greedy
                .open(&target, "127.0.0.1")
                .await
                .expect("within the share"),
        );
    }
    let again = DialClient::connect(&client_config(&rig, &rig.pki.root, "greedy"))
        .await
        .expect("connects");
    let refused = again.open(&target, "127.0.0.1").await;
    assert!(
        matches!(
            refused,
            Err(ClientError::StreamRefused {
                reason: russh::ChannelOpenFailure::ResourceShortage,
                ..
            })
        ),
        "a stream beyond the share must be refused: {:?}",
        refused.err()
    );
    // Another client is not affected, and its stream carries bytes.
    let other = DialClient::connect(&client_config(&rig, &rig.pki.root, "other"))
        .await
        .expect("connects");
    let mut stream = other.open(&target, "127.0.0.1").await.expect("own share");
    echo_once(&mut stream, b"ping").await;
    // The share comes back when a stream ends.
    drop(held.pop());
    // (The proxy learns of the end when the channel closes: try until it has.)
    within(
        "a freed place in the share",
        Duration::from_secs(10),
        async {
            while again.open(&target, "127.0.0.1").await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;
}
