use super::*;
use crate::identity::CertificateAuthority;
use crate::operator::crd::reverse_tunnel::{KeySetAnswer, Phase};
use crate::protocol::ClusterName;

use RotationPhase::{Init, Retire, Rollback, Standby, UpdateClients};

struct World {
    current: PublicKey,
    next: PublicKey,
}

fn world() -> World {
    let ca = || {
        CertificateAuthority::generate(ClusterName::new("leaf-1").unwrap())
            .unwrap()
            .public_key()
            .clone()
    };
    World {
        current: ca(),
        next: ca(),
    }
}

impl World {
    fn key(&self, which: Which) -> PublicKey {
        match which {
            Which::Current => self.current.clone(),
            Which::Next => self.next.clone(),
        }
    }

    fn set(&self, at: u64, keys: &[Which]) -> KeySet {
        KeySet {
            cluster: ClusterName::new("leaf-1").unwrap(),
            issued_at: at,
            keys: keys.iter().map(|w| self.key(*w)).collect(),
        }
    }

    /// A replica whose agents use `signer` and heard `answer` (issued at, accepted).
    fn replica(&self, signer: Option<Which>, answer: Option<(u64, bool)>) -> ReplicaHolding {
        ReplicaHolding {
            name: "op-0".to_owned(),
            phase: Phase::Connected,
            connected: 1,
            expected: 1,
            reason: String::new(),
            message: String::new(),
            proxies: Vec::new(),
            observed_generation: None,
            observed_at: None,
            identity_ca: signer.map(|w| fingerprint(&self.key(w))),
            ca_keys: answer.map(|(issued_at, accepted)| KeySetAnswer {
                issued_at,
                accepted,
                message: if accepted {
                    String::new()
                } else {
                    "not signed by a trusted key".to_owned()
                },
            }),
        }
    }
}

fn facts<'a>(
    w: &'a World,
    asked: RotationPhase,
    published: Option<&'a KeySet>,
    replicas: &'a [ReplicaHolding],
) -> Facts<'a> {
    Facts {
        asked,
        previous: Standby,
        current: &w.current,
        next: Some(&w.next),
        published,
        trusted_set_of: None,
        agent_signer: Some(Which::Current),
        replicas,
    }
}

#[test]
fn a_rotation_moves_forward_only_once_the_step_before_is_confirmed() {
    let w = world();
    // Init: publish both, agents stay on the old key until the root trusts both.
    let p = plan(&facts(&w, Init, None, &[]));
    assert_eq!(
        (p.publish.as_deref(), p.agent_ca, p.phase, p.complete),
        (Some(&BOTH[..]), Which::Current, Init, false)
    );
    // Asking UpdateClients early changes nothing: the root does not trust the new key yet.
    let both = w.set(10, &BOTH);
    let unanswered = [w.replica(Some(Which::Current), None)];
    let p = plan(&facts(&w, UpdateClients, Some(&both), &unanswered));
    assert_eq!(
        (p.agent_ca, p.phase, p.complete),
        (Which::Current, Init, false)
    );
    // Once it does, Init is complete and UpdateClients re-issues from the new key.
    let trusted = [w.replica(Some(Which::Current), Some((10, true)))];
    let p = plan(&facts(&w, Init, Some(&both), &trusted));
    assert_eq!((p.phase, p.complete), (Init, true));
    let p = plan(&facts(&w, UpdateClients, Some(&both), &trusted));
    assert_eq!(
        (p.agent_ca, p.phase, p.complete),
        (Which::Next, UpdateClients, false)
    );
    // Retire waits until every replica's agents use the new key.
    let mixed = [
        w.replica(Some(Which::Next), Some((10, true))),
        w.replica(None, Some((10, true))),
    ];
    let p = plan(&facts(&w, Retire, Some(&both), &mixed));
    assert_eq!(
        (p.publish.as_deref(), p.phase, p.complete),
        (Some(&BOTH[..]), UpdateClients, false)
    );
    let moved = [
        w.replica(Some(Which::Next), Some((10, true))),
        w.replica(Some(Which::Next), Some((10, true))),
    ];
    let p = plan(&facts(&w, Retire, Some(&both), &moved));
    assert_eq!(
        (p.publish.as_deref(), p.phase, p.complete),
        (Some(&[Which::Next][..]), Retire, false)
    );
    // The root trusts the new key alone: promoted, whatever is asked now.
    let alone = w.set(11, &[Which::Next]);
    let retired = [w.replica(Some(Which::Next), Some((11, true)))];
    for asked in [Retire, Rollback, Standby, Init] {
        let p = plan(&facts(&w, asked, Some(&alone), &retired));
        assert_eq!(p.change, Some(SecretChange::Promote), "{asked:?}");
        assert_eq!((p.agent_ca, p.complete), (Which::Next, true));
    }
}

#[test]
fn a_rollback_brings_agents_back_before_the_root_drops_the_new_key() {
    let w = world();
    let both = w.set(10, &BOTH);
    let on_next = [w.replica(Some(Which::Next), Some((10, true)))];
    let mut f = facts(&w, Rollback, Some(&both), &on_next);
    f.agent_signer = Some(Which::Next);
    // The root trusts both: agents go back to the old key first; the set stays.
    let p = plan(&f);
    assert_eq!(
        (p.publish.as_deref(), p.agent_ca, p.phase),
        (Some(&BOTH[..]), Which::Current, Rollback)
    );
    // Every agent is back: the old key alone is published.
    let back = [w.replica(Some(Which::Current), Some((10, true)))];
    let p = plan(&facts(&w, Rollback, Some(&both), &back));
    assert_eq!(p.publish.as_deref(), Some(&[Which::Current][..]));
    // And once the root trusts it alone, ca-next goes.
    let old_alone = w.set(11, &[Which::Current]);
    let done = [w.replica(Some(Which::Current), Some((11, true)))];
    let p = plan(&facts(&w, Rollback, Some(&old_alone), &done));
    assert_eq!(
        (p.change, p.phase, p.complete),
        (Some(SecretChange::DropNext), Standby, true)
    );
}

#[test]
fn a_rollback_during_retire_republishes_both_before_moving_any_agent() {
    let w = world();
    // Retire's set is out, not yet trusted; the agents use the new key.
    let alone = w.set(11, &[Which::Next]);
    let pending = [w.replica(Some(Which::Next), Some((10, true)))];
    let mut f = facts(&w, Rollback, Some(&alone), &pending);
    f.agent_signer = Some(Which::Next);
    let p = plan(&f);
    assert_eq!(
        (p.publish.as_deref(), p.agent_ca, p.complete),
        (Some(&BOTH[..]), Which::Next, false)
    );
}

#[test]
fn a_refusal_is_said_and_an_unset_spec_holds_the_phase_in_effect() {
    let w = world();
    let both = w.set(10, &BOTH);
    let refused = [w.replica(Some(Which::Current), Some((10, false)))];
    let p = plan(&facts(&w, Init, Some(&both), &refused));
    assert!(p.message.contains("refused"), "{}", p.message);
    // No phase asked, UpdateClients in effect: it goes on, it does not fall back.
    let trusted = [w.replica(Some(Which::Current), Some((10, true)))];
    let mut f = facts(&w, Standby, Some(&both), &trusted);
    f.previous = UpdateClients;
    assert_eq!(plan(&f).agent_ca, Which::Next);
    // No ca-next: standby, and a set published before returns to the old key alone.
    let mut f = facts(&w, Retire, Some(&both), &trusted);
    f.next = None;
    let p = plan(&f);
    assert_eq!(
        (p.publish.as_deref(), p.phase, p.complete),
        (Some(&[Which::Current][..]), Standby, true)
    );
    f.published = None;
    assert_eq!(plan(&f).publish, None);
}

#[test]
fn a_replica_starting_afresh_does_not_make_the_rotation_step_back() {
    let w = world();
    let both = w.set(10, &BOTH);
    let trusted = [w.replica(Some(Which::Current), Some((10, true)))];
    let f = facts(&w, UpdateClients, Some(&both), &trusted);
    assert_eq!(f.trusted_set(), Some(10));
    // The new agent of a handover has heard no answer yet: the root's trust is remembered.
    let afresh = [w.replica(None, None)];
    let mut f = facts(&w, UpdateClients, Some(&both), &afresh);
    assert_eq!(plan(&f).phase, Init, "without the memory it steps back");
    f.trusted_set_of = Some(10);
    let p = plan(&f);
    assert_eq!((p.agent_ca, p.phase), (Which::Next, UpdateClients));
}
