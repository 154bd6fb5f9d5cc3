//! What can go wrong in a reconcile, as one type the controller's error policy handles.

/// A reconcile failure; the controller logs it and retries the object with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed (network, conflict, permissions).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The spec refers to something not there yet (a Secret); retried with backoff.
    #[error("{reason}: {message}")]
    Unresolved {
        /// The condition reason reported in status.
        reason: &'static str,
        /// What is missing.
        message: String,
    },
    /// The object could not be read as a `ReverseTunnel` (schema drift, manual edits).
    #[error("malformed object: {0}")]
    Malformed(String),
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
