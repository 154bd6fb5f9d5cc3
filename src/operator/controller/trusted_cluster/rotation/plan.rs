//! The decisions of a leaf CA rotation, apart from the API calls that carry them out: from
//! the phase asked, the keys the leaf holds, the set it last published and what its replicas
//! report, what to do now. Pure, so every path is a unit test.
//!
//! The one rule every step keeps: **an agent only ever holds a certificate from a key the root
//! trusts at that moment, and the root is only ever asked to drop a key no agent uses.** So
//! the steps of a rotation each wait for the one before:
//!
//! ```text
//!  forward  publish [ca, next] ── root trusts both ──▶ agents re-issued from next ── every
//!           replica reports next ──▶ publish [next] ── root trusts next alone ──▶ promote
//!  back     publish [ca, next] (if needed) ── root trusts ca ──▶ agents re-issued from ca ──
//!           every replica reports ca ──▶ publish [ca] ── root trusts ca alone ──▶ drop next
//! ```
//!
//! Once the root trusts the new key alone, the old one is gone there: whatever is asked, the
//! rotation completes (the new key becomes `ca`). That is why `Retire` cannot be rolled back.

use russh::keys::PublicKey;

use crate::identity::fingerprint;
use crate::identity::keyset::KeySet;
use crate::operator::crd::reverse_tunnel::ReplicaHolding;
use crate::operator::crd::trusted_cluster::RotationPhase;

/// One of the leaf's two CA keys during a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The key in force (`ca`).
    Current,
    /// The key being rotated in (`ca-next`).
    Next,
}

/// A change to the leaf CA Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretChange {
    /// `ca-next` becomes `ca`; the old `ca` is kept as `ca-retired`.
    Promote,
    /// `ca-next` is dropped (a rollback completed).
    DropNext,
}

/// What the planner knows.
pub struct Facts<'a> {
    /// The phase `spec.caRotation` asks for (`Standby` when unset).
    pub asked: RotationPhase,
    /// The phase in effect before (the status'), which an unset spec keeps.
    pub previous: RotationPhase,
    /// The key in force.
    pub current: &'a PublicKey,
    /// The key being rotated in, if the Secret holds one.
    pub next: Option<&'a PublicKey>,
    /// The set last published, as it reads.
    pub published: Option<&'a KeySet>,
    /// When the set the root was last seen to trust was issued.
    pub trusted_set_of: Option<u64>,
    /// Which key signed the agents' certificate now (`None`: neither, or unreadable).
    pub agent_signer: Option<Which>,
    /// The tunnel's replica entries.
    pub replicas: &'a [ReplicaHolding],
}

/// What to do now.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Which key issues the agents' certificate.
    pub agent_ca: Which,
    /// The keys to publish (the first signs); `None`: publish nothing.
    pub publish: Option<Vec<Which>>,
    /// A change to the leaf CA Secret, made once everything else is.
    pub change: Option<SecretChange>,
    /// The phase in effect.
    pub phase: RotationPhase,
    /// Whether that phase's work is done.
    pub complete: bool,
    /// What it waits for, or what it did.
    pub message: String,
}

/// The root's answer to a set, as the replicas heard it.
enum Answer<'a> {
    Accepted,
    Refused(&'a str),
    Pending,
}

impl Facts<'_> {
    fn key(&self, which: Which) -> Option<&PublicKey> {
        match which {
            Which::Current => Some(self.current),
            Which::Next => self.next,
        }
    }

    /// Whether the published set holds exactly `keys`, in that order.
    fn published_is(&self, keys: &[Which]) -> bool {
        self.published.is_some_and(|set| {
            set.keys.len() == keys.len()
                && set.keys.iter().zip(keys).all(|(have, want)| {
                    self.key(*want)
                        .is_some_and(|k| k.key_data() == have.key_data())
                })
        })
    }

    /// The root's answer to the published set.
    fn answer(&self) -> Answer<'_> {
        let Some(set) = self.published else {
            return Answer::Pending;
        };
        if self.trusted_set_of == Some(set.issued_at) {
            return Answer::Accepted;
        }
        let answers = self
            .replicas
            .iter()
            .filter_map(|r| r.ca_keys.as_ref())
            .filter(|a| a.issued_at == set.issued_at);
        let mut refused = None;
        for answer in answers {
            if answer.accepted {
                return Answer::Accepted;
            }
            refused = Some(answer.message.as_str());
        }
        refused.map_or(Answer::Pending, Answer::Refused)
    }

    /// When the published set was issued, if the root trusts it.
    pub fn trusted_set(&self) -> Option<u64> {
        match self.answer() {
            Answer::Accepted => self.published.map(|set| set.issued_at),
            _ => self.trusted_set_of,
        }
    }

    /// Whether the root trusts exactly `keys` now (they are published and accepted).
    fn root_trusts(&self, keys: &[Which]) -> bool {
        self.published_is(keys) && matches!(self.answer(), Answer::Accepted)
    }

    /// Whether every replica reports agents of `which` alone.
    fn all_agents_use(&self, which: Which) -> bool {
        let Some(key) = self.key(which) else {
            return false;
        };
        let print = fingerprint(key);
        !self.replicas.is_empty()
            && self
                .replicas
                .iter()
                .all(|r| r.identity_ca.as_deref() == Some(print.as_str()))
    }

    /// "waiting for the root to …", with its refusal if it gave one.
    fn waiting_for_root(&self, what: &str) -> String {
        match self.answer() {
            Answer::Refused(why) => format!("the root refused the key set: {why}"),
            _ => format!("waiting for the root to trust {what}"),
        }
    }
}

const BOTH: [Which; 2] = [Which::Current, Which::Next];

fn plan_of(
    agent_ca: Which,
    publish: &[Which],
    phase: RotationPhase,
    complete: bool,
    message: impl Into<String>,
) -> Plan {
    Plan {
        agent_ca,
        publish: Some(publish.to_vec()),
        change: None,
        phase,
        complete,
        message: message.into(),
    }
}

/// What to do now, given `facts`.
pub fn plan(facts: &Facts<'_>) -> Plan {
    if facts.next.is_none() {
        return standby(facts);
    }
    if facts.root_trusts(&[Which::Next]) {
        return Plan {
            change: Some(SecretChange::Promote),
            ..plan_of(
                Which::Next,
                &[Which::Next],
                RotationPhase::Retire,
                true,
                "the root trusts the new key alone: it is now the key in force, and the old one is kept as ca-retired",
            )
        };
    }
    let asked = match facts.asked {
        RotationPhase::Standby => facts.previous,
        asked => asked,
    };
    match asked {
        RotationPhase::Standby => Plan {
            message: "the Secret holds a ca-next key; ask phase Init to rotate to it".to_owned(),
            ..standby(facts)
        },
        RotationPhase::Rollback => rollback(facts),
        target => forward(facts, target),
    }
}

/// No rotation: agents from `ca`; a set published before is brought back to `ca` alone.
fn standby(facts: &Facts<'_>) -> Plan {
    let publish = facts.published.map(|_| vec![Which::Current]);
    let message = format!(
        "no rotation under way; the key in force is {}",
        fingerprint(facts.current)
    );
    Plan {
        agent_ca: Which::Current,
        publish,
        change: None,
        phase: RotationPhase::Standby,
        complete: true,
        message,
    }
}

/// Init, UpdateClients and Retire, each waiting for the one before.
fn forward(facts: &Facts<'_>, target: RotationPhase) -> Plan {
    use RotationPhase::{Init, Retire, UpdateClients};
    if target == Retire && facts.published_is(&[Which::Next]) {
        let message = facts.waiting_for_root("the new key alone");
        return plan_of(Which::Next, &[Which::Next], Retire, false, message);
    }
    if !facts.root_trusts(&BOTH) {
        let message = facts.waiting_for_root("both keys");
        return plan_of(Which::Current, &BOTH, Init, false, message);
    }
    if target == Init {
        let message = "the root trusts both keys; next: UpdateClients";
        return plan_of(Which::Current, &BOTH, Init, true, message);
    }
    if !facts.all_agents_use(Which::Next) {
        let message = "waiting for every replica's agents to hold certificates from the new key";
        return plan_of(Which::Next, &BOTH, UpdateClients, false, message);
    }
    if target == UpdateClients {
        let message = "every replica's agents use the new key; next: Retire";
        return plan_of(Which::Next, &BOTH, UpdateClients, true, message);
    }
    let message = facts.waiting_for_root("the new key alone");
    plan_of(Which::Next, &[Which::Next], Retire, false, message)
}

/// Back to `ca` alone: the root must trust `ca` before any agent goes back to it, and every
/// agent must be back before the root drops `ca-next`.
fn rollback(facts: &Facts<'_>) -> Plan {
    use RotationPhase::Rollback;
    if facts.root_trusts(&[Which::Current]) {
        return Plan {
            change: Some(SecretChange::DropNext),
            ..plan_of(
                Which::Current,
                &[Which::Current],
                RotationPhase::Standby,
                true,
                "rolled back: the root trusts the old key alone, and ca-next is dropped",
            )
        };
    }
    if !facts.root_trusts(&BOTH) && !facts.published_is(&[Which::Current]) {
        let keep = facts.agent_signer.unwrap_or(Which::Current);
        let message = facts.waiting_for_root("the old key again");
        return plan_of(keep, &BOTH, Rollback, false, message);
    }
    if !facts.all_agents_use(Which::Current) {
        let message = "waiting for every replica's agents to hold certificates from the old key";
        return plan_of(Which::Current, &BOTH, Rollback, false, message);
    }
    let message = facts.waiting_for_root("the old key alone");
    plan_of(Which::Current, &[Which::Current], Rollback, false, message)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
