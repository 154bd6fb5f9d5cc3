//! Join tokens kept as Secrets, and the [`JoinAuthority`] that checks them and records
//! joined leaves as `RemoteCluster` objects.
//!
//! A token is a Secret named `tether-join-<ID>` of type [`TOKEN_SECRET_TYPE`] in the proxies'
//! namespace (as kubeadm keeps bootstrap tokens). Proxies read it by name, so their RBAC needs
//! `get` on Secrets but never `list`; a single-use token is spent by a patch conditional on
//! the Secret's `resourceVersion`, so two replicas admitting the same token at once cannot
//! both succeed.
//!
//! Single-use means single-use. The spend records who used the token and with which CA keys
//! (fingerprints), and a second patch marks when the leaf's `RemoteCluster` was recorded. A
//! used token admits again only the same leaf with the same keys, and only while its
//! `RemoteCluster` stands, or before it was ever recorded (so a lost answer never strands a
//! leaf); once the leaf is revoked, the token is spent for good, and goes: a recorded token is
//! the `RemoteCluster`'s dependent (an owner reference), so the garbage collector deletes it
//! with the leaf.
//!
//! ```text
//!   unused ──spend (used-by, used-with; conditional)──▶ used ──RemoteCluster created──▶ recorded
//!   used:      retry by the same leaf + keys ─▶ admitted (record created now)
//!   recorded:  retry by the same leaf + keys ─▶ admitted only while the RemoteCluster exists
//!   otherwise                                ─▶ TokenAlreadyUsed
//! ```

use std::collections::BTreeMap;
use std::time::SystemTime;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::identity::fingerprint;
use crate::operator::crd::{RemoteCluster, RemoteClusterSpec};
use crate::protocol::ClusterName;
use crate::protocol::join::{JoinRefusal, JoinToken};
use crate::proxy::{Admission, JoinAuthority, Refused};
use russh::keys::PublicKey;

/// The `type` of a join token Secret.
pub const TOKEN_SECRET_TYPE: &str = "tether.dev/join-token";
/// Label on token Secrets, to list them (`kubectl get secrets -l tether.dev/join-token`).
pub const TOKEN_LABEL: &str = "tether.dev/join-token";
/// Label on a `RemoteCluster`: the token it joined with.
pub const JOINED_WITH_LABEL: &str = "tether.dev/joined-with";

const KEY_ID: &str = "token-id";
const KEY_SECRET: &str = "token-secret";
const KEY_EXPIRATION: &str = "expiration";
const KEY_USAGE: &str = "usage";
const KEY_USED_BY: &str = "used-by";
const KEY_USED_AT: &str = "used-at";
/// The fingerprints of the CA keys the token admitted, comma-separated and sorted.
const KEY_USED_WITH: &str = "used-with";
/// When the admitted leaf's `RemoteCluster` was recorded: from then on, its deletion spends
/// the token for good.
const KEY_RECORDED_AT: &str = "recorded-at";
const SINGLE_USE: &str = "single-use";
const REUSABLE: &str = "reusable";

/// The Secret name of the token with this ID.
pub fn secret_name(id: &str) -> String {
    format!("tether-join-{id}")
}

/// The Secret that issues `token`: what `tether join-token` prints for `kubectl apply`.
pub fn token_secret(
    token: &JoinToken,
    namespace: Option<&str>,
    expires: Option<SystemTime>,
    reusable: bool,
) -> Secret {
    let mut data = BTreeMap::from([
        (KEY_ID.to_owned(), token.id().to_owned()),
        (KEY_SECRET.to_owned(), token.secret().to_owned()),
        (
            KEY_USAGE.to_owned(),
            if reusable { REUSABLE } else { SINGLE_USE }.to_owned(),
        ),
    ]);
    if let Some(at) = expires {
        data.insert(KEY_EXPIRATION.to_owned(), rfc3339(at));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(token.id())),
            namespace: namespace.map(str::to_owned),
            labels: Some(BTreeMap::from([(
                TOKEN_LABEL.to_owned(),
                "true".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.to_owned()),
        string_data: Some(data),
        ..Secret::default()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A token Secret, read back.
struct StoredToken {
    token: JoinToken,
    single_use: bool,
    used_by: Option<String>,
    used_at: Option<String>,
    /// Fingerprints of the CA keys it admitted (see [`KEY_USED_WITH`]).
    used_with: Option<String>,
    /// Whether the admitted leaf was recorded (see [`KEY_RECORDED_AT`]).
    recorded: bool,
    resource_version: Option<String>,
}

/// Tokens in Secrets, joined leaves in `RemoteCluster` objects, all in one namespace.
pub struct KubeJoinAuthority {
    secrets: Api<Secret>,
    remotes: Api<RemoteCluster>,
    namespace: String,
}

impl KubeJoinAuthority {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            secrets: Api::namespaced(client.clone(), namespace),
            remotes: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
        }
    }

    async fn load(&self, id: &str) -> Result<StoredToken, Refused> {
        let name = secret_name(id);
        let secret = self
            .secrets
            .get_opt(&name)
            .await
            .map_err(|e| unavailable(format!("reading Secret {}/{name}: {e}", self.namespace)))?
            .filter(|s| s.type_.as_deref() == Some(TOKEN_SECRET_TYPE))
            .ok_or_else(|| {
                Refused::new(
                    JoinRefusal::TokenUnknown,
                    format!(
                        "join token {id} does not exist (never issued, or deleted); ask the root's administrator for a new one"
                    ),
                )
            })?;
        let data = secret.data.unwrap_or_default();
        let field = |key: &str| {
            data.get(key)
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
        };
        let invalid = |what: &str| {
            Refused::new(
                JoinRefusal::TokenUnknown,
                format!("join token {id}'s Secret {name} is malformed ({what}); reissue it"),
            )
        };
        if field(KEY_ID).as_deref() != Some(id) {
            return Err(invalid("token-id does not match its name"));
        }
        let token = field(KEY_SECRET)
            .and_then(|secret| JoinToken::from_parts(id, secret.trim()).ok())
            .ok_or_else(|| invalid("token-secret"))?;
        if let Some(expiration) = field(KEY_EXPIRATION) {
            let at = humantime::parse_rfc3339_weak(expiration.trim())
                .map_err(|_| invalid("expiration is not RFC 3339"))?;
            if SystemTime::now() > at {
                return Err(Refused::new(
                    JoinRefusal::TokenExpired,
                    format!("join token {id} expired at {}", expiration.trim()),
                ));
            }
        }
        let single_use = match field(KEY_USAGE).as_deref().map(str::trim) {
            None | Some(SINGLE_USE) => true,
            Some(REUSABLE) => false,
            Some(_) => return Err(invalid("usage is neither single-use nor reusable")),
        };
        Ok(StoredToken {
            token,
            single_use,
            used_by: field(KEY_USED_BY),
            used_at: field(KEY_USED_AT),
            used_with: field(KEY_USED_WITH),
            recorded: field(KEY_RECORDED_AT).is_some(),
            resource_version: secret.metadata.resource_version,
        })
    }

    /// The `RemoteCluster` named `leaf`, if any; refuses the name if it trusts other CA keys.
    async fn check_name(
        &self,
        leaf: &str,
        keys: &[String],
    ) -> Result<Option<RemoteCluster>, Refused> {
        let existing = self
            .remotes
            .get_opt(leaf)
            .await
            .map_err(|e| unavailable(format!("reading RemoteCluster {leaf}: {e}")))?;
        match existing {
            Some(rc) if !same_keys(&rc.spec.ca_keys, keys) => Err(Refused::new(
                JoinRefusal::NameTaken,
                format!(
                    "a leaf named {leaf} already joined with another CA (RemoteCluster {}/{leaf}); pick another name, or have the root delete that RemoteCluster",
                    self.namespace
                ),
            )),
            found => Ok(found),
        }
    }

    /// Marks a single-use token as spent, unless someone changed it since `stored` was read.
    async fn spend(
        &self,
        stored: &StoredToken,
        leaf: &str,
        used_with: &str,
    ) -> Result<(), Refused> {
        let id = stored.token.id();
        let patch = json!({
            "metadata": { "resourceVersion": stored.resource_version },
            "stringData": {
                KEY_USED_BY: leaf,
                KEY_USED_AT: rfc3339(SystemTime::now()),
                KEY_USED_WITH: used_with,
            },
        });
        match self
            .secrets
            .patch(
                &secret_name(id),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Err(Refused::new(
                JoinRefusal::TokenAlreadyUsed,
                format!("join token {id} was used by another join at the same moment"),
            )),
            Err(e) => Err(unavailable(format!("spending join token {id}: {e}"))),
        }
    }

    /// Creates the leaf's `RemoteCluster` (or finds the one a retry or a race made first) and
    /// returns it.
    async fn record(
        &self,
        admission: &Admission,
        keys: Vec<String>,
    ) -> Result<RemoteCluster, Refused> {
        let leaf = admission.leaf.to_string();
        let mut rc = RemoteCluster::new(
            &leaf,
            RemoteClusterSpec {
                ca_keys: keys.clone(),
                join_token: Some(admission.token_id.clone()),
            },
        );
        rc.metadata.labels = Some(BTreeMap::from([(
            JOINED_WITH_LABEL.to_owned(),
            admission.token_id.clone(),
        )]));
        match self.remotes.create(&PostParams::default(), &rc).await {
            Ok(created) => Ok(created),
            // Created meanwhile (a retry, or a race): fine if it names the same CA.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                self.check_name(&leaf, &keys).await?.ok_or_else(|| {
                    unavailable(format!(
                        "RemoteCluster {leaf} was deleted while this join recorded it"
                    ))
                })
            }
            Err(e) => Err(unavailable(format!("creating RemoteCluster {leaf}: {e}"))),
        }
    }

    /// Marks a single-use token's leaf as recorded: from now on, deleting its `RemoteCluster`
    /// spends the token for good. The token becomes the `RemoteCluster`'s dependent, so the
    /// garbage collector deletes it with the leaf's revocation: a spent token does not stay
    /// behind.
    async fn mark_recorded(&self, id: &str, record: &RemoteCluster) -> Result<(), Refused> {
        let owners: Vec<_> = record.owner_ref(&()).into_iter().collect();
        let patch = json!({
            "metadata": { "ownerReferences": owners },
            "stringData": { KEY_RECORDED_AT: rfc3339(SystemTime::now()) },
        });
        self.secrets
            .patch(
                &secret_name(id),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
            .map_err(|e| unavailable(format!("marking join token {id} recorded: {e}")))
    }
}

/// Why a used single-use token may not admit `leaf` with keys `used_with` again, if it may
/// not: another leaf or other keys used it, or its leaf was recorded and has been revoked
/// since (`record_exists` is false).
fn reuse_refusal(
    stored: &StoredToken,
    leaf: &str,
    used_with: &str,
    record_exists: bool,
) -> Option<String> {
    let user = stored.used_by.as_deref()?;
    let id = stored.token.id();
    let at = stored.used_at.as_deref().unwrap_or("an unknown time");
    let why = if user != leaf {
        format!("join token {id} was already used by {user} at {at}")
    } else if stored.used_with.as_deref() != Some(used_with) {
        format!("join token {id} was already used by {leaf} at {at}, with another CA")
    } else if stored.recorded && !record_exists {
        format!(
            "join token {id} was already used by {leaf} at {at}, and that leaf has been revoked since (its RemoteCluster was deleted)"
        )
    } else {
        return None;
    };
    Some(format!("{why}; ask the root's administrator for a new one"))
}

/// The fingerprints of `keys`, sorted and comma-separated: how a token records the CA it
/// admitted (fingerprints, not keys, so the Secret stays readable).
fn fingerprints(keys: &[russh::keys::PublicKey]) -> String {
    let mut prints: Vec<String> = keys.iter().map(fingerprint).collect();
    prints.sort();
    prints.dedup();
    prints.join(",")
}

fn unavailable(message: String) -> Refused {
    Refused::new(JoinRefusal::Unavailable, message)
}

fn same_keys(a: &[String], b: &[String]) -> bool {
    let norm = |keys: &[String]| {
        let mut v: Vec<String> = keys
            .iter()
            // Compare algorithm and key, not the comment.
            .map(|k| k.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .collect();
        v.sort();
        v
    };
    norm(a) == norm(b)
}

/// Annotation on a `RemoteCluster`: when the key set now in its spec was issued (seconds since
/// the Unix epoch), so that an older set, replayed, is never applied again.
pub const KEYS_ISSUED_AT: &str = "tether.dev/ca-keys-issued-at";

/// How many times a key set is applied again after the record changed under it (a status
/// write, another replica's apply): each try reads the record anew and checks again.
const ROTATE_ATTEMPTS: usize = 5;

impl KubeJoinAuthority {
    /// See [`JoinAuthority::rotate`]: the record's `spec.caKeys` replaced, with the set's time
    /// in [`KEYS_ISSUED_AT`], under the record's resourceVersion; a record changed meanwhile
    /// is read and checked again (so a newer set applied meanwhile wins).
    async fn rotate_keys(
        &self,
        leaf: &str,
        keys: &[PublicKey],
        issued_at: u64,
    ) -> Result<(), String> {
        let keys: Vec<String> = keys
            .iter()
            .map(|k| k.to_openssh().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let mut conflict = String::new();
        for _ in 0..ROTATE_ATTEMPTS {
            match self.try_rotate_keys(leaf, &keys, issued_at).await {
                Err(kube::Error::Api(s)) if s.code == 409 => conflict = s.message,
                Err(e) => return Err(format!("updating the RemoteCluster of {leaf}: {e}")),
                Ok(outcome) => return outcome,
            }
        }
        Err(format!(
            "the RemoteCluster of {leaf} kept changing ({conflict}); send the set again"
        ))
    }

    /// One try of [`Self::rotate_keys`]: `Err` for the API's errors, `Ok(Err)` for a refusal.
    async fn try_rotate_keys(
        &self,
        leaf: &str,
        keys: &[String],
        issued_at: u64,
    ) -> Result<Result<(), String>, kube::Error> {
        let Some(record) = self.remotes.get_opt(leaf).await? else {
            return Ok(Err(format!(
                "{leaf} has no RemoteCluster in {}: its trust is static, and not rotated from the leaf",
                self.namespace
            )));
        };
        let last: u64 = record
            .annotations()
            .get(KEYS_ISSUED_AT)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        // Every tunnel of the leaf sends its set on connecting: the set already applied is
        // answered as applied, without a write.
        if issued_at == last && same_keys(&record.spec.ca_keys, keys) {
            return Ok(Ok(()));
        }
        if issued_at <= last {
            return Ok(Err(format!(
                "the key set issued at {issued_at} is not newer than the one applied ({last})"
            )));
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": record.resource_version(),
                "annotations": { KEYS_ISSUED_AT: issued_at.to_string() },
            },
            "spec": { "caKeys": keys },
        });
        self.remotes
            .patch(leaf, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(Ok(()))
    }
}

impl JoinAuthority for KubeJoinAuthority {
    fn rotate<'a>(
        &'a self,
        leaf: &'a ClusterName,
        keys: &'a [PublicKey],
        issued_at: u64,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.rotate_keys(leaf.as_str(), keys, issued_at))
    }

    fn token<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<JoinToken, Refused>> {
        Box::pin(async move { self.load(id).await.map(|stored| stored.token) })
    }

    fn admit<'a>(&'a self, admission: &'a Admission) -> BoxFuture<'a, Result<(), Refused>> {
        Box::pin(async move {
            let leaf = admission.leaf.as_str();
            let keys = admission
                .ca_keys
                .iter()
                .map(|k| k.to_openssh())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| unavailable(format!("encoding the leaf's CA: {e}")))?;
            let stored = self.load(&admission.token_id).await?;
            let existing = self.check_name(leaf, &keys).await?;
            let used_with = fingerprints(&admission.ca_keys);
            if stored.single_use {
                if stored.used_by.is_some() {
                    let refusal = reuse_refusal(&stored, leaf, &used_with, existing.is_some());
                    if let Some(message) = refusal {
                        return Err(Refused::new(JoinRefusal::TokenAlreadyUsed, message));
                    }
                } else {
                    self.spend(&stored, leaf, &used_with).await?;
                }
            }
            let record = self.record(admission, keys).await?;
            if stored.single_use && !stored.recorded {
                self.mark_recorded(&admission.token_id, &record).await?;
            }
            Ok(())
        })
    }
}
