//! Helpers the operator tests share: polling with a deadline, CRDs, Secrets, a dial through a
//! proxy.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::{conditions, wait::await_condition};
use kube::{Api, Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tether::protocol::Target;
use tether::proxy::{Dialer, ProxyServer};
use tether::stream::Splice;

/// How long a condition in the operator tests may take.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` every 100 ms until it yields a value, failing with `what` after `deadline`.
pub async fn eventually_within<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`eventually_within`] [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, check).await
}

/// Applies every Tether CRD and waits until each is Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in tether::operator::crd::all() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("tether-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        tokio::time::timeout(
            DEADLINE,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD not Established in time")
        .expect("watching the CRD");
    }
}

/// An Opaque Secret with `data` as string data.
pub fn secret(name: &str, data: &[(&str, String)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Dials `target` through `proxy`, sends "ping", and returns what came back.
pub async fn echo_through(proxy: &ProxyServer, target: &str) -> Result<Vec<u8>, String> {
    let target = Target::parse(target).map_err(|e| e.to_string())?;
    let conn = proxy
        .dialer()
        .dial(target, "127.0.0.1:0".parse().expect("addr"))
        .await
        .map_err(|e| e.to_string())?;
    let (mut mine, theirs) = tokio::io::duplex(64 * 1024);
    let splice = tokio::spawn(conn.splice(theirs));
    mine.write_all(b"ping").await.map_err(|e| e.to_string())?;
    mine.shutdown().await.map_err(|e| e.to_string())?;
    let mut echoed = Vec::new();
    mine.read_to_end(&mut echoed)
        .await
        .map_err(|e| e.to_string())?;
    let _ = splice.await;
    Ok(echoed)
}
