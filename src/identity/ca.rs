//! A cluster's certificate authority, which issues the certificates proxies, agents and clients
//! present.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngCore;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{Certificate, PrivateKey, PublicKey};

use crate::protocol::target::ClusterName;

use super::error::IdentityError;
use super::groups::{GROUPS_EXTENSION, encode, validate_group};
use super::keyfile::{Overwrite, generate_key, read_private_key, write_key_pair};
use super::role::{ROLE_EXTENSION, Role};

/// The comment `tether ca init` gives a CA key, followed by the cluster's name: the key says
/// which cluster it was made for, so it cannot be used for another by mistake.
const CA_COMMENT_PREFIX: &str = "tether-ca ";
use super::verify::{fingerprint, unix_seconds, validate_proxy_id, validate_user_name};

/// How far in the past certificates start to be valid, so that a peer whose clock runs a little
/// behind the issuer's accepts a certificate issued a moment ago.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// A cluster's certificate authority: the key that signs its proxies', agents' and clients'
/// certificates. Its public half is what other clusters put in their trust stores.
#[derive(Clone)]
pub struct CertificateAuthority {
    cluster: ClusterName,
    key: PrivateKey,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cluster", &self.cluster)
            .field("fingerprint", &fingerprint(self.public_key()))
            .finish()
    }
}

impl CertificateAuthority {
    /// Creates a CA with a fresh Ed25519 key, for a new cluster (or a CA rotation).
    pub fn generate(cluster: ClusterName) -> Result<Self, IdentityError> {
        let key = generate_key(&format!("{CA_COMMENT_PREFIX}{cluster}"))?;
        Ok(Self { cluster, key })
    }

    /// Wraps an existing key, e.g. one read from a Kubernetes Secret rather than a file.
    pub fn from_key(cluster: ClusterName, key: PrivateKey) -> Self {
        Self { cluster, key }
    }

    /// The cluster this CA speaks for.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The CA's public key, to distribute to trust stores.
    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The CA's private key, to store it (in a Secret, say).
    pub fn private_key(&self) -> &PrivateKey {
        &self.key
    }

    /// Loads a CA from an unencrypted OpenSSH private key file, refusing one other users may
    /// read.
    ///
    /// A key made by `tether ca init` names its cluster in its comment (`tether-ca <cluster>`);
    /// loading it for another cluster is refused. Keys made elsewhere carry no such claim.
    pub fn load(path: &Path, cluster: ClusterName) -> Result<Self, IdentityError> {
        let key = read_private_key(path)?;
        if let Some(made_for) = AsRef::<str>::as_ref(key.comment()).strip_prefix(CA_COMMENT_PREFIX)
            && made_for != cluster.as_str()
        {
            return Err(IdentityError::CaClusterMismatch {
                path: path.to_owned(),
                made_for: made_for.to_owned(),
                given: cluster,
            });
        }
        Ok(Self { cluster, key })
    }

    /// Saves the private key at `path` (mode 0600) and the public key at `path.pub`, in the
    /// formats `ssh-keygen` uses, replacing them if they exist.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        write_key_pair(&self.key, path, Overwrite::Replace)
    }

    /// Like [`CertificateAuthority::save`], but fails naming `path` or `path.pub` if either
    /// exists: a replaced CA key silently invalidates every certificate the old one issued.
    pub fn save_new(&self, path: &Path) -> Result<(), IdentityError> {
        write_key_pair(&self.key, path, Overwrite::Refuse)
    }

    /// Issues a host certificate for proxy replica `proxy_id`, with principal
    /// `<proxy_id>.<cluster>`, so agents can check they reached this cluster's proxy and which.
    pub fn issue_host(
        &self,
        proxy_id: &str,
        key: &PublicKey,
        validity: Duration,
    ) -> Result<Certificate, IdentityError> {
        validate_proxy_id(proxy_id).map_err(|reason| IdentityError::InvalidName {
            what: "proxy id",
            value: proxy_id.to_owned(),
            reason,
        })?;
        let principal = format!("{proxy_id}.{}", self.cluster);
        let mut builder = self.builder(key, validity)?;
        let step = |r: Result<&mut Builder, _>| r.map(|_| ()).map_err(sign_error);
        step(builder.cert_type(CertType::Host))?;
        step(builder.key_id(format!("proxy {principal}")))?;
        step(builder.valid_principal(principal))?;
        builder.sign(&self.key).map_err(sign_error)
    }

    /// Issues a user certificate for `principal` with `role`: an agent's (principal = its cluster)
    /// or a root-side client's (principal = its name).
    pub fn issue_user(
        &self,
        role: Role,
        principal: &str,
        key: &PublicKey,
        validity: Duration,
    ) -> Result<Certificate, IdentityError> {
        self.issue_user_in(role, principal, &[], key, validity)
    }

    /// [`issue_user`](Self::issue_user) for a client in `groups` (see [`super::groups`]).
    pub fn issue_user_in(
        &self,
        role: Role,
        principal: &str,
        groups: &[String],
        key: &PublicKey,
        validity: Duration,
    ) -> Result<Certificate, IdentityError> {
        validate_user_name(principal).map_err(|reason| IdentityError::InvalidName {
            what: "user name",
            value: principal.to_owned(),
            reason,
        })?;
        for group in groups {
            validate_group(group).map_err(|reason| IdentityError::InvalidName {
                what: "group",
                value: group.clone(),
                reason,
            })?;
        }
        let mut builder = self.builder(key, validity)?;
        let step = |r: Result<&mut Builder, _>| r.map(|_| ()).map_err(sign_error);
        step(builder.cert_type(CertType::User))?;
        step(builder.key_id(format!("{role} {principal}")))?;
        step(builder.valid_principal(principal))?;
        step(builder.extension(ROLE_EXTENSION, role.as_str()))?;
        if !groups.is_empty() {
            step(builder.extension(GROUPS_EXTENSION, encode(groups)))?;
        }
        // What OpenSSH grants by default; harmless for Tether and keeps `ssh -W` usable.
        step(builder.extension("permit-port-forwarding", ""))?;
        builder.sign(&self.key).map_err(sign_error)
    }

    /// Issues this cluster's agent certificate (principal = the cluster's name).
    pub fn issue_agent(
        &self,
        key: &PublicKey,
        validity: Duration,
    ) -> Result<Certificate, IdentityError> {
        self.issue_user(Role::Agent, self.cluster.as_str(), key, validity)
    }

    /// A builder with a random nonce and serial, valid from [`CLOCK_SKEW_ALLOWANCE`] ago until
    /// `validity` from now.
    fn builder(&self, key: &PublicKey, validity: Duration) -> Result<Builder, IdentityError> {
        let now = SystemTime::now();
        let valid_after = unix_seconds(now).saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs());
        let valid_before = unix_seconds(now)
            .checked_add(validity.as_secs())
            .filter(|_| unix_seconds(now) > 0)
            .ok_or_else(|| {
                IdentityError::Validity(format!(
                    "{validity:?} from now does not fit a certificate (or the clock is before 1970)"
                ))
            })?;
        let mut rng = rand::rng();
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let mut builder =
            Builder::new(nonce.to_vec(), key, valid_after, valid_before).map_err(sign_error)?;
        builder.serial(rng.next_u64()).map_err(sign_error)?;
        Ok(builder)
    }
}

fn sign_error(source: russh::keys::ssh_key::Error) -> IdentityError {
    IdentityError::Key {
        action: "sign certificate".to_owned(),
        source,
    }
}
