//! The join exchange: its two message types as the root and the leaf read them off the wire,
//! the checks each side then applies, and join tokens as an administrator pastes them.
//!
//! Invariants: a decoded message re-encodes and decodes to itself; a parsed token reveals the
//! text it came from (trimmed) and its ID passes the ID check; a proof made with a token
//! verifies with it and with no other token, for any field values a peer can send.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tether::identity::PublicKey;
use tether::protocol::ClusterName;
use tether::protocol::control::encode;
use tether::stream::frames::read_message;
use tether::protocol::join::{JoinToken, JoinerMessage, RootMessage, validate_token_id};

const TOKEN: &str = "abcdef.0123456789abcdef";
const OTHER: &str = "abcdef.0123456789abcdee";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => root_reads(rest),
        1 => leaf_reads(rest),
        _ => token_text(rest),
    }
});

/// What the root does with a leaf's message: read it, then check what it names.
fn root_reads(wire: &[u8]) {
    let Ok(message) = common::block_on(read_message::<JoinerMessage, _>(&mut &wire[..])) else {
        return;
    };
    round_trips(&message);
    let token = JoinToken::parse(TOKEN).expect("fixed token");
    let other = JoinToken::parse(OTHER).expect("fixed token");
    match &message {
        JoinerMessage::Hello {
            token_id, nonce, ..
        } => {
            let _ = validate_token_id(token_id);
            let proof = token.root_proof(nonce, "root", &[]);
            assert!(token.verify_root_proof(&proof, nonce, "root", &[]));
            assert!(!other.verify_root_proof(&proof, nonce, "root", &[]));
        }
        JoinerMessage::Join {
            leaf_cluster,
            ca_keys,
            proof,
        } => {
            let _ = token.verify_leaf_proof(proof, "n", leaf_cluster, ca_keys);
            let genuine = token.leaf_proof("n", leaf_cluster, ca_keys);
            assert!(token.verify_leaf_proof(&genuine, "n", leaf_cluster, ca_keys));
            assert!(!token.verify_root_proof(&genuine, "n", leaf_cluster, ca_keys));
            names_and_keys(leaf_cluster, ca_keys);
        }
    }
}

/// What the leaf does with the root's answer.
fn leaf_reads(wire: &[u8]) {
    let Ok(message) = common::block_on(read_message::<RootMessage, _>(&mut &wire[..])) else {
        return;
    };
    round_trips(&message);
    if let RootMessage::Challenge {
        root_cluster,
        ca_keys,
        nonce,
        proof,
    } = &message
    {
        let token = JoinToken::parse(TOKEN).expect("fixed token");
        let _ = token.verify_root_proof(proof, nonce, root_cluster, ca_keys);
        names_and_keys(root_cluster, ca_keys);
    }
    if let RootMessage::Refused { reason, .. } = &message {
        let _ = (reason.as_str(), reason.is_transient());
    }
}

/// The cluster name and CA keys a peer sends, checked as both sides check them.
fn names_and_keys(cluster: &str, ca_keys: &[String]) {
    if let Ok(name) = ClusterName::new(cluster) {
        assert_eq!(name.as_str(), cluster);
    }
    for text in ca_keys {
        if let Ok(key) = PublicKey::from_openssh(text) {
            let again = key.to_openssh().expect("a parsed key re-encodes");
            let reparsed = PublicKey::from_openssh(&again).expect("a re-encoded key parses");
            assert_eq!(reparsed.key_data(), key.key_data());
        }
    }
}

fn round_trips<T>(message: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let encoded = encode(message).expect("a decoded message re-encodes");
    let again = common::block_on(read_message::<T, _>(&mut &encoded[..])).expect("re-decodes");
    assert_eq!(&again, message);
}

/// A token as pasted into `tether join` or a file.
fn token_text(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(token) = JoinToken::parse(text) else {
        return;
    };
    assert_eq!(token.reveal(), text.trim());
    assert!(validate_token_id(token.id()).is_ok());
    assert_eq!(
        JoinToken::from_parts(token.id(), token.secret()).as_ref(),
        Ok(&token)
    );
    assert!(!format!("{token:?} {token}").contains(token.secret()));
}
