//! Joining: once per `TrustedCluster`, remembered by the root CA Secret it leaves behind.

use super::*;

/// Joins unless the root CA Secret shows an earlier join; returns the root's name and CA
/// fingerprint.
pub(super) async fn ensure_joined(
    tc: &TrustedCluster,
    ctx: &Context,
    secrets: &Api<Secret>,
) -> std::result::Result<(ClusterName, String), Blocked> {
    let name = tc.name_any();
    let stored = secrets.get_opt(&root_ca_secret(&name)).await.map_err(|e| {
        Blocked::new(
            "SecretUnreadable",
            e.to_string(),
            Some(Duration::from_secs(10)),
        )
    })?;
    if let Some(secret) = stored {
        return joined_from(&secret);
    }
    if !tc.spec.enabled {
        return Err(Blocked::new(
            "Disabled",
            "enabled is false; not joining",
            None,
        ));
    }
    let mut request = join_request(tc, secrets).await?;
    request.route = match &tc.spec.tunnel.egress_proxy {
        None => ctx.route.clone(),
        Some(egress) => {
            let mut unused = std::collections::hash_map::DefaultHasher::new();
            crate::operator::egress_proxy::route(egress, secrets, &mut unused)
                .await
                .map_err(|u| {
                    let retry = u.retry.then_some(Duration::from_secs(10));
                    Blocked::new(u.problem.reason, u.problem.message, retry)
                })?
        }
    };
    // The operator's TLS settings for a tls:// root, whichever the proxy.
    request.route.tls = ctx.route.tls.clone();
    info!(trusted_cluster = %name, root = %request.root_address, token = %request.token, "joining the root");
    let joined = join(&request).await.map_err(|e| {
        let retry = if e.is_transient() {
            Duration::from_secs(15)
        } else {
            // A refused token stays refused: a new token (its Secret is watched) or a spec
            // edit triggers the next attempt at once; this retry is only a safety net.
            Duration::from_secs(60)
        };
        Blocked::new(e.reason(), e.to_string(), Some(retry))
    });
    let joined = match joined {
        Ok(j) => j,
        Err(blocked) => {
            publish(ctx, tc, EventType::Warning, "JoinFailed", &blocked.message).await;
            return Err(blocked);
        }
    };
    let keys = joined
        .root_cas
        .iter()
        .filter_map(|k| k.to_openssh().ok())
        .collect::<Vec<_>>()
        .join("\n");
    let mut meta = owned_meta(tc, root_ca_secret(&name));
    meta.annotations = Some(BTreeMap::from([(
        ROOT_CLUSTER_ANNOTATION.to_owned(),
        joined.root_cluster.to_string(),
    )]));
    let secret = Secret {
        metadata: meta,
        string_data: Some(BTreeMap::from([(
            ROOT_CA_KEY.to_owned(),
            format!("{keys}\n"),
        )])),
        ..Secret::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(|e| {
            Blocked::new(
                "SecretNotWritten",
                e.to_string(),
                Some(Duration::from_secs(10)),
            )
        })?;
    let message = format!(
        "joined root {} (CA {})",
        joined.root_cluster,
        joined.fingerprint()
    );
    publish(ctx, tc, EventType::Normal, "Joined", &message).await;
    Ok((joined.root_cluster.clone(), joined.fingerprint()))
}

/// The root's name and fingerprint from a root CA Secret this controller wrote.
pub(super) fn joined_from(secret: &Secret) -> std::result::Result<(ClusterName, String), Blocked> {
    let broken = |what: &str| {
        Blocked::new(
            "RootCaSecretInvalid",
            format!(
                "Secret {} {what}; delete it to join again",
                secret.name_any()
            ),
            None,
        )
    };
    let root = secret
        .annotations()
        .get(ROOT_CLUSTER_ANNOTATION)
        .and_then(|n| ClusterName::new(n.as_str()).ok())
        .ok_or_else(|| broken("has no valid root-cluster annotation"))?;
    let first = secret
        .data
        .as_ref()
        .and_then(|d| d.get(ROOT_CA_KEY))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(|t| t.lines().find(|l| !l.trim().is_empty()))
        .and_then(|l| PublicKey::from_openssh(l.trim()).ok())
        .ok_or_else(|| broken("holds no CA key"))?;
    Ok((root, fingerprint(&first)))
}

pub(super) async fn join_request(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<JoinRequest, Blocked> {
    let from = |u: crate::operator::secret_read::Unusable| {
        let retry = u.retry.then_some(Duration::from_secs(10));
        Blocked::new(u.problem.reason, u.problem.message, retry)
    };
    let token_text = secret_text(
        secrets,
        &tc.spec.token_secret_ref.name,
        TOKEN_KEY,
        "InvalidToken",
    )
    .await
    .map_err(from)?;
    let token = JoinToken::parse(&token_text).map_err(|e| {
        Blocked::new(
            "InvalidToken",
            format!(
                "Secret {:?} key {TOKEN_KEY:?}: {e}",
                tc.spec.token_secret_ref.name
            ),
            None,
        )
    })?;
    let leaf_ca = leaf_ca(tc, secrets).await?;
    Ok(JoinRequest {
        root_address: tc.spec.root_address.clone(),
        route: crate::transport::Route::direct(),
        token,
        leaf_cluster: leaf_ca.cluster().clone(),
        leaf_cas: vec![leaf_ca.public_key().clone()],
        root_ca_pin: tc.spec.root_ca_fingerprint.clone(),
        timeout: JOIN_TIMEOUT,
    })
}

/// The leaf CA Secret `tc` names.
pub(super) async fn leaf_ca_secret(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<Secret, Blocked> {
    let name = &tc.spec.leaf_ca_secret_ref.name;
    let retry = Some(Duration::from_secs(10));
    secrets
        .get_opt(name)
        .await
        .map_err(|e| {
            Blocked::new(
                "SecretUnreadable",
                format!("reading Secret {name:?}: {e}"),
                retry,
            )
        })?
        .ok_or_else(|| {
            Blocked::new(
                "SecretNotFound",
                format!("Secret {name:?} not found"),
                retry,
            )
        })
}

/// The CA private key under `key` in the leaf CA Secret `secret` of `tc`, if there.
pub(super) fn ca_key_in(
    tc: &TrustedCluster,
    secret: &Secret,
    key: &str,
) -> std::result::Result<Option<CertificateAuthority>, Blocked> {
    let cluster = ClusterName::new(tc.spec.leaf_cluster.as_str())
        .map_err(|e| Blocked::new("InvalidLeafCluster", e.to_string(), None))?;
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Ok(None);
    };
    std::str::from_utf8(&bytes.0)
        .ok()
        .and_then(|text| PrivateKey::from_openssh(text.as_bytes()).ok())
        .filter(|k| !k.is_encrypted())
        .map(|k| Some(CertificateAuthority::from_key(cluster, k)))
        .ok_or_else(|| {
            Blocked::new(
                "InvalidLeafCa",
                format!(
                    "Secret {:?} key {key:?} is not an unencrypted OpenSSH private key",
                    secret.name_any()
                ),
                None,
            )
        })
}

/// The leaf CA in force: key `ca` of the leaf CA Secret.
pub(super) fn ca_in_force(
    tc: &TrustedCluster,
    secret: &Secret,
) -> std::result::Result<CertificateAuthority, Blocked> {
    ca_key_in(tc, secret, LEAF_CA_KEY)?.ok_or_else(|| {
        Blocked::new(
            "InvalidLeafCa",
            format!("Secret {:?} has no key {LEAF_CA_KEY:?}", secret.name_any()),
            None,
        )
    })
}

/// The leaf CA in force, read from its Secret.
pub(super) async fn leaf_ca(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
) -> std::result::Result<CertificateAuthority, Blocked> {
    ca_in_force(tc, &leaf_ca_secret(tc, secrets).await?)
}
