//! Certificate authorities, OpenSSH certificates and the trust store.
