//! Reading a text value out of a Secret a spec names, and what a spec that cannot run shows
//! ([`Unusable`]): shared by every resolver of a spec (the ReverseTunnel's, its egress proxy's,
//! the TrustedCluster's), below all of them.

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use super::status::Problem;

/// A problem, and whether retrying later may fix it without a spec or Secret change.
pub struct Unusable {
    /// What to report.
    pub problem: Problem,
    /// `true` for things that may appear on their own (a Secret not created yet).
    pub retry: bool,
}

/// An [`Unusable`] with `reason` (the status condition's reason) and `message`.
pub(crate) fn unusable(reason: &'static str, message: String, retry: bool) -> Unusable {
    Unusable {
        problem: Problem { reason, message },
        retry,
    }
}

/// The text under `key` in Secret `name`. A Secret not found or not readable may come later
/// (retried); a missing key or a value that is not text is the spec's problem, `reason`.
pub(crate) async fn secret_text(
    secrets: &Api<Secret>,
    name: &str,
    key: &str,
    reason: &'static str,
) -> Result<String, Unusable> {
    let secret = match secrets.get_opt(name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(unusable(
                "SecretNotFound",
                format!("Secret {name:?} not found"),
                true,
            ));
        }
        Err(e) => {
            return Err(unusable(
                "SecretUnreadable",
                format!("reading Secret {name:?}: {e}"),
                true,
            ));
        }
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| unusable(reason, format!("Secret {name:?} has no key {key:?}"), false))?;
    String::from_utf8(bytes).map_err(|_| {
        unusable(
            reason,
            format!("Secret {name:?} key {key:?} is not text"),
            false,
        )
    })
}
