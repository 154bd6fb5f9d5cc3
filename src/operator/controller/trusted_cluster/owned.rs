//! What a `TrustedCluster` owns: the agent identity Secret and the `ReverseTunnel`, created,
//! renewed and deleted here.

use super::*;

pub(super) fn root_ca_secret(tc: &str) -> String {
    format!("{tc}-root-ca")
}

pub(super) fn agent_secret(tc: &str) -> String {
    format!("{tc}-agent")
}

pub(super) fn owner_reference(tc: &TrustedCluster) -> Option<OwnerReference> {
    let mut owner = tc.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

pub(super) fn owned_meta(tc: &TrustedCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: tc.namespace(),
        labels: Some(BTreeMap::from([(OWNER_LABEL.to_owned(), tc.name_any())])),
        owner_references: owner_reference(tc).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The objects a `TrustedCluster` owns as they stand, read once per reconcile for both the
/// rotation and the tunnel.
pub(super) struct Owned {
    /// The agent identity Secret.
    pub agent: Option<Secret>,
    /// The `ReverseTunnel` of the same name (maybe not ours: [`ensure_tunnel`] checks).
    pub tunnel: Option<ReverseTunnel>,
}

/// Reads what `tc` owns.
pub(super) async fn read_owned(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
    tunnels: &Api<ReverseTunnel>,
) -> std::result::Result<Owned, Blocked> {
    let name = tc.name_any();
    let retry = Some(Duration::from_secs(10));
    let agent = secrets
        .get_opt(&agent_secret(&name))
        .await
        .map_err(|e| Blocked::new("SecretUnreadable", e.to_string(), retry))?;
    let tunnel = tunnels
        .get_opt(&name)
        .await
        .map_err(|e| Blocked::new("TunnelUnreadable", e.to_string(), retry))?;
    Ok(Owned { agent, tunnel })
}

/// Issues (or renews) the agent identity from the key the rotation names and applies the
/// `ReverseTunnel`, with the key set the rotation publishes.
pub(super) async fn ensure_tunnel(
    tc: &TrustedCluster,
    root: &ClusterName,
    (secrets, tunnels): (&Api<Secret>, &Api<ReverseTunnel>),
    owned: &Owned,
    rotated: &Rotated,
) -> std::result::Result<Option<String>, Blocked> {
    let name = tc.name_any();
    let identity_name = agent_secret(&name);
    let from_another_key = |s: &Secret| {
        rotated
            .agent_ca
            .as_ref()
            .is_some_and(|ca| certificate_signer(s).as_ref() != Some(ca.public_key().key_data()))
    };
    if owned
        .agent
        .as_ref()
        .is_none_or(|s| needs_renewal(s) || from_another_key(s))
    {
        // No rotation under way: the key in force, read only now that it is needed.
        let ca = match &rotated.agent_ca {
            Some(ca) => ca.clone(),
            None => leaf_ca(tc, secrets).await?,
        };
        let identity = Identity::generate_agent(&ca, AGENT_CERT_VALIDITY)
            .map_err(|e| Blocked::new("IdentityNotIssued", e.to_string(), None))?;
        write_identity(tc, secrets, &identity_name, &identity).await?;
        info!(trusted_cluster = %name, ca = %fingerprint(ca.public_key()), "issued the agent certificate");
    }
    let spec = ReverseTunnelSpec {
        root_cluster: root.to_string(),
        leaf_cluster: tc.spec.leaf_cluster.clone(),
        proxy_address: tc.spec.root_address.clone(),
        identity_secret_ref: SecretReference {
            name: identity_name,
        },
        root_ca_secret_ref: SecretReference {
            name: root_ca_secret(&name),
        },
        tunnel: tc.spec.tunnel.clone(),
        ca_key_set: rotated.key_set.clone(),
    };
    // Reconciles follow the tunnel's status changes too; an unchanged spec is not rewritten.
    let existing = owned.tunnel.as_ref();
    let uid = tc.uid();
    let ours = existing.is_some_and(|rt| {
        rt.owner_references()
            .iter()
            .any(|o| Some(&o.uid) == uid.as_ref())
    });
    if ours && existing.is_some_and(|rt| rt.spec == spec) {
        return Ok(Some(name));
    }
    // Our own tunnel, edited by hand (`kubectl edit` takes the fields it changed): this object
    // is its source, so the edit is replaced, by force, and said in the log. A tunnel of the
    // same name that is not ours stays untouched: applying without force conflicts.
    let params = if ours {
        if existing.is_some() {
            info!(trusted_cluster = %name, "restoring the ReverseTunnel's spec from its TrustedCluster (edit the TrustedCluster instead)");
        }
        PatchParams::apply(FIELD_MANAGER).force()
    } else {
        PatchParams::apply(FIELD_MANAGER)
    };
    let patch = json!({
        "apiVersion": "tether.dev/v1alpha1",
        "kind": "ReverseTunnel",
        "metadata": {
            "name": name,
            "labels": { OWNER_LABEL: name },
            "ownerReferences": owner_reference(tc).map(|o| vec![o]),
        },
        "spec": spec,
    });
    tunnels
        .patch(&name, &params, &Patch::Apply(&patch))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 409 => Blocked::new(
                "TunnelNameTaken",
                format!(
                    "ReverseTunnel {name} exists and belongs to someone else ({}); rename this TrustedCluster or delete that tunnel",
                    s.message
                ),
                Some(Duration::from_secs(60)),
            ),
            _ => Blocked::new(
                "TunnelNotWritten",
                e.to_string(),
                Some(Duration::from_secs(10)),
            ),
        })?;
    Ok(Some(name))
}

/// The agent certificate in `secret`, if it reads.
fn agent_certificate(secret: &Secret) -> Option<Certificate> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(IDENTITY_CERT))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .and_then(|t| Certificate::from_openssh(t.trim()).ok())
}

/// The CA key that signed the agent certificate in `secret`.
pub(super) fn certificate_signer(secret: &Secret) -> Option<KeyData> {
    agent_certificate(secret).map(|c| c.signature_key().clone())
}

/// Whether the agent certificate in `secret` is missing, unreadable, or past two thirds of
/// its validity.
pub(super) fn needs_renewal(secret: &Secret) -> bool {
    let Some(cert) = agent_certificate(secret) else {
        return true;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let remaining = cert.valid_before().saturating_sub(now);
    remaining < AGENT_CERT_VALIDITY.as_secs() / 3
}

pub(super) async fn write_identity(
    tc: &TrustedCluster,
    secrets: &Api<Secret>,
    name: &str,
    identity: &Identity,
) -> std::result::Result<(), Blocked> {
    let failed = |e: String| Blocked::new("IdentityNotIssued", e, Some(Duration::from_secs(10)));
    let key = identity
        .key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| failed(e.to_string()))?;
    let cert = identity
        .certificate
        .to_openssh()
        .map_err(|e| failed(e.to_string()))?;
    let mut meta = owned_meta(tc, name.to_owned());
    meta.managed_fields = None;
    let patch = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": { IDENTITY_KEY: key.as_str(), IDENTITY_CERT: format!("{cert}\n") },
    });
    secrets
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map(|_| ())
        .map_err(|e| failed(e.to_string()))
}

pub(super) async fn disable(
    tc: &TrustedCluster,
    tunnels: &Api<ReverseTunnel>,
) -> std::result::Result<(), Blocked> {
    delete_owned(tunnels, &tc.name_any(), tc)
        .await
        .map_err(|e| {
            Blocked::new(
                "TunnelNotDeleted",
                e.to_string(),
                Some(Duration::from_secs(10)),
            )
        })
}

/// Deletes `name` if it exists and `tc` owns it.
pub(super) async fn delete_owned<K>(
    api: &Api<K>,
    name: &str,
    tc: &TrustedCluster,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(obj) = api.get_opt(name).await? else {
        return Ok(());
    };
    let uid = tc.uid();
    let owned = obj
        .meta()
        .owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == uid.as_ref());
    if owned {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) async fn cleanup(tc: &TrustedCluster, ctx: &Context, namespace: &str) -> Result<Action> {
    let name = tc.name_any();
    info!(trusted_cluster = %name, "TrustedCluster deleted; removing its tunnel and Secrets");
    let tunnels: Api<ReverseTunnel> = Api::namespaced(ctx.client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    delete_owned(&tunnels, &name, tc).await?;
    delete_owned(&secrets, &agent_secret(&name), tc).await?;
    delete_owned(&secrets, &root_ca_secret(&name), tc).await?;
    Ok(Action::await_change())
}
