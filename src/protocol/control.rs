//! The control channel: heartbeats, discovery and drain, one per tunnel.
//!
//! The agent opens an SSH session channel and asks for the [`CONTROL_SUBSYSTEM`]; after that both
//! sides exchange length-prefixed JSON messages (a 4-byte big-endian length, then the JSON).
//! JSON keeps the channel readable in a packet capture and lets either side add fields.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::version::ProtocolVersion;

/// The subsystem name that turns a session channel into the control channel.
pub const CONTROL_SUBSYSTEM: &str = "tether-control@tether.dev";

/// Largest control message accepted (a discovery list of ~2,000 proxies fits).
pub const MAX_CONTROL_MESSAGE: usize = 256 * 1024;

/// One proxy replica, as discovery names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// The proxy's ID, the first label of its host certificate principal.
    pub id: String,
    /// Rollout generation: agents prefer proxies of the newest generation when they must choose.
    #[serde(default)]
    pub generation: u64,
}

/// Messages from the agent to the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message: who is speaking and how often it intends to send heartbeats.
    Hello {
        /// The agent's Tether release, for logs and the root's inventory of the leaf.
        version: String,
        /// Heartbeat interval the agent asks for; the proxy may clamp it.
        heartbeat_interval_ms: u64,
        /// The control protocol the agent speaks; absent before protocol versions (1.0)
        /// ([`super::version`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<ProtocolVersion>,
    },
    /// A heartbeat; the proxy answers with `Pong` carrying the same sequence number.
    Ping {
        seq: u64,
        /// The proxies this agent holds tunnels to now, so every proxy can tell which of its
        /// peers hold the site's tunnels.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        held: Vec<String>,
    },
    /// The agent has seen a `Reconnect` and is leaving.
    ReconnectAck,
    /// The agent is stopping (its operator replica shuts down): the proxy sends no new dial on
    /// this tunnel while another tunnel of the site can take it, and closes the tunnel once the
    /// streams on it have ended; the agent keeps it (and its heartbeats) until then, at most
    /// `LEAVE_GRACE`. (A proxy that predates this message closes the tunnel at once.)
    Leaving,
    /// What the agent tells the root about its leaf (protocol 1.1): sent after `Welcome`, and
    /// again whenever it changes. Sent only to a proxy that speaks 1.1.
    Report(LeafReport),
    /// The leaf's CA keys from now on, signed by one of its CA keys the root trusts now
    /// (protocol 1.2): how a CA rotation reaches the root (`identity::keyset`). The proxy
    /// answers with `CaKeysAnswer`.
    CaKeys(CaKeySet),
}

/// A cluster's CA key set and its signature, as they travel (`identity::keyset` makes and
/// checks them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaKeySet {
    /// The signed statement: the cluster, when, and the keys, one a line.
    pub statement: String,
    /// The SSH signature over it (`-----BEGIN SSH SIGNATURE-----` PEM).
    pub signature: String,
}

/// Most allow-list rules a report carries: more than any real allow-list, and a bound on what
/// one leaf may make the root store.
pub const MAX_REPORTED_RULES: usize = 256;
/// Longest allow-list rule a report carries (a host name of 253 characters and a port list).
pub const MAX_REPORTED_RULE_LEN: usize = 512;
/// Most bytes of rules a report carries in all: what one agent may make each proxy hold, and
/// what it adds to the leaf's `RemoteCluster` (the root keeps a few agents' lists per replica
/// there, under the API server's object size limit of 1.5 MiB).
pub const MAX_REPORTED_ALLOW_BYTES: usize = 16 * 1024;
/// Longest version string or replica name a report carries.
pub const MAX_REPORTED_NAME_LEN: usize = 253;

/// An agent's account of its leaf, for the root's inventory (`RemoteCluster` status) and for
/// refusing at the root, without a round trip, dials the leaf's allow-list cannot permit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafReport {
    /// The agent's replica (the leaf operator's pod), so the root can tell agents apart.
    pub replica: String,
    /// When this agent started, in seconds since the Unix epoch.
    pub started_at: u64,
    /// The leaf's Kubernetes API server version (`gitVersion`), when the agent has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_version: Option<String>,
    /// The allow-list the agent enforces: its rules, in order (rules name no secret).
    pub allow: Vec<String>,
    /// Whether the agent serves `_apiserver` dials.
    #[serde(default)]
    pub api_server: bool,
    /// Whether the agent serves the root's Kubernetes requests.
    #[serde(default)]
    pub kube_api: bool,
    /// Fingerprints of the root CA keys the agent trusts (protocol 1.3): during a root CA
    /// rotation, the root sees which leaves already trust its new key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_keys: Vec<String>,
}

/// A report outside [`LeafReport`]'s bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("the report carries {0} allow-list rules; at most {MAX_REPORTED_RULES} are kept")]
    TooManyRules(usize),
    #[error("a reported allow-list rule is {0} bytes long; at most {MAX_REPORTED_RULE_LEN}")]
    RuleTooLong(usize),
    #[error("the reported allow-list has {0} bytes of rules; at most {MAX_REPORTED_ALLOW_BYTES}")]
    TooLarge(usize),
    #[error("a reported {0} is empty, too long or not printable")]
    BadName(&'static str),
}

impl LeafReport {
    /// Checks the report's sizes and characters before it is kept or shown anywhere.
    pub fn validate(&self) -> Result<(), ReportError> {
        if self.allow.len() > MAX_REPORTED_RULES {
            return Err(ReportError::TooManyRules(self.allow.len()));
        }
        if let Some(rule) = self.allow.iter().find(|r| r.len() > MAX_REPORTED_RULE_LEN) {
            return Err(ReportError::RuleTooLong(rule.len()));
        }
        let bytes: usize = self.allow.iter().map(String::len).sum();
        if bytes > MAX_REPORTED_ALLOW_BYTES {
            return Err(ReportError::TooLarge(bytes));
        }
        if !self
            .allow
            .iter()
            .all(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(ReportError::BadName("allow-list rule"));
        }
        if !printable_name(&self.replica) {
            return Err(ReportError::BadName("replica"));
        }
        if !self
            .kubernetes_version
            .as_deref()
            .is_none_or(printable_name)
        {
            return Err(ReportError::BadName("Kubernetes version"));
        }
        if self.root_keys.len() > crate::identity::keyset::MAX_KEYS
            || !self.root_keys.iter().all(|k| printable_name(k))
        {
            return Err(ReportError::BadName("root key fingerprint"));
        }
        Ok(())
    }
}

/// A short, visible ASCII name: what a version or a pod name is, and nothing that could
/// forge a log line or a column (rules are held to the same characters).
pub fn printable_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_REPORTED_NAME_LEN
        && text.bytes().all(|b| b.is_ascii_graphic())
}

/// Messages from the proxy to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProxyMessage {
    /// Answer to `Hello`: the settings both sides now use.
    Welcome {
        /// The proxy's ID (also in its host certificate).
        proxy_id: String,
        /// The heartbeat interval the agent must keep.
        heartbeat_interval_ms: u64,
        /// A tunnel is offline after this many intervals without a heartbeat.
        missed_heartbeats: u32,
        /// The control protocol the proxy speaks; absent before protocol versions (1.0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<ProtocolVersion>,
    },
    /// Answer to `Ping`.
    Pong { seq: u64 },
    /// The proxies the agent should hold tunnels to (the seed's "discovery request").
    Discovery { proxies: Vec<ProxyInfo> },
    /// The proxy is draining: the agent should open a tunnel elsewhere and then leave.
    Reconnect { reason: String },
    /// The proxy will not serve this agent (its protocol's major version is not the proxy's):
    /// why, for the agent's status. The proxy closes the tunnel after it.
    Refused { reason: String },
    /// Answer to `CaKeys` (protocol 1.2): the set issued at `issued_at` is the leaf's trust
    /// now, or, with `refused`, why not.
    CaKeysAnswer {
        issued_at: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    /// The root's CA keys from now on, signed by one of them the agent trusts now (protocol
    /// 1.3): how a root CA rotation reaches the leaves. Sent after `Welcome` when the proxy
    /// has a set to announce, and again whenever it changes.
    RootKeys(CaKeySet),
}

/// A control message that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message of {len} bytes exceeds the limit of {MAX_CONTROL_MESSAGE}")]
    TooLarge { len: usize },
    #[error("malformed control message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("reading a control message: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer closed the channel before a complete message")]
    Closed,
}

/// Encodes one message with its length prefix.
pub fn encode<T: Serialize>(message: &T) -> Result<Bytes, ControlError> {
    let json = serde_json::to_vec(message)?;
    if json.len() > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge { len: json.len() });
    }
    let mut out = BytesMut::with_capacity(4 + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    Ok(out.freeze())
}

/// Reassembles length-prefixed messages from the chunks a channel delivers, never holding more
/// than one maximal message.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    /// Appends received bytes. The buffer never holds more than one maximal message plus one
    /// chunk, because a length prefix over the limit is refused as soon as it is seen.
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), ControlError> {
        self.buf.extend_from_slice(chunk);
        match self.pending_len() {
            Some(len) if len > MAX_CONTROL_MESSAGE => Err(ControlError::TooLarge { len }),
            _ => Ok(()),
        }
    }

    fn pending_len(&self) -> Option<usize> {
        (self.buf.len() >= 4).then(|| {
            u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize
        })
    }

    /// Takes the next complete message, if one has arrived.
    pub fn next_message<T: for<'de> Deserialize<'de>>(
        &mut self,
    ) -> Result<Option<T>, ControlError> {
        let Some(len) = self.pending_len() else {
            return Ok(None);
        };
        if len > MAX_CONTROL_MESSAGE {
            return Err(ControlError::TooLarge { len });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        let body = self.buf.split_to(len);
        Ok(Some(serde_json::from_slice(&body)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_arbitrary_chunking() {
        let msgs = vec![
            ProxyMessage::Welcome {
                proxy_id: "p1".into(),
                heartbeat_interval_ms: 1000,
                missed_heartbeats: 3,
                protocol: Some(ProtocolVersion::CURRENT),
            },
            ProxyMessage::Pong { seq: 7 },
            ProxyMessage::Discovery {
                proxies: vec![ProxyInfo {
                    id: "p2".into(),
                    generation: 1,
                }],
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&encode(m).unwrap());
        }
        for chunk in [1, 3, 7, wire.len()] {
            let mut r = FrameReader::default();
            let mut out = Vec::new();
            for c in wire.chunks(chunk) {
                r.push(c).unwrap();
                while let Some(m) = r.next_message::<ProxyMessage>().unwrap() {
                    out.push(m);
                }
            }
            assert_eq!(out, msgs);
        }
    }

    #[test]
    fn oversized_and_malformed_messages_are_errors() {
        let mut r = FrameReader::default();
        assert!(matches!(
            r.push(&u32::MAX.to_be_bytes()),
            Err(ControlError::TooLarge { .. })
        ));
        let mut r = FrameReader::default();
        r.push(&[0, 0, 0, 2, b'{', b'x']).unwrap();
        assert!(matches!(
            r.next_message::<AgentMessage>(),
            Err(ControlError::Malformed(_))
        ));
        let mut r = FrameReader::default();
        assert!(r.push(&[0x7f, 0, 0, 0]).is_err());
    }
}

/// Protocol 1.0's control messages, as the proxies and agents before versions wrote them.
#[cfg(test)]
mod protocol_1_0 {
    use super::*;

    const WIRE: &str = include_str!("../../tests/fixtures/control-1.0.jsonl");

    fn lines(side: &str) -> impl Iterator<Item = &'static str> + '_ {
        WIRE.lines()
            .filter_map(move |l| l.strip_prefix(side)?.strip_prefix(' '))
    }

    #[test]
    fn every_message_of_protocol_1_0_reads_and_writes_back_byte_for_byte() {
        for line in lines("agent") {
            let message: AgentMessage = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&message).unwrap(), line);
        }
        for line in lines("proxy") {
            let message: ProxyMessage = serde_json::from_str(line).unwrap();
            assert_eq!(serde_json::to_string(&message).unwrap(), line);
        }
        assert_eq!(lines("agent").count() + lines("proxy").count(), 9);
    }

    #[test]
    fn a_hello_or_welcome_of_protocol_1_0_names_no_version_and_so_means_1_0() {
        let hello: AgentMessage = serde_json::from_str(lines("agent").next().unwrap()).unwrap();
        let AgentMessage::Hello { protocol, .. } = hello else {
            panic!("{hello:?}")
        };
        assert_eq!(ProtocolVersion::or_first(protocol), ProtocolVersion::V1_0);
        let welcome: ProxyMessage = serde_json::from_str(lines("proxy").next().unwrap()).unwrap();
        let ProxyMessage::Welcome { protocol, .. } = welcome else {
            panic!("{welcome:?}")
        };
        assert_eq!(ProtocolVersion::or_first(protocol), ProtocolVersion::V1_0);
    }
}

#[cfg(test)]
mod report_bounds {
    use super::*;

    fn report() -> LeafReport {
        LeafReport {
            replica: "tether-operator-0".into(),
            started_at: 1_764_000_000,
            kubernetes_version: Some("v1.37.2".into()),
            allow: vec!["10.0.0.0/8:5432".into()],
            api_server: true,
            kube_api: false,
            root_keys: vec!["SHA256:G4z+bUvNoBAd3Ah7owUHXzYB/NgS/HVzDwiJt/yaQQ4".into()],
        }
    }

    #[test]
    fn a_report_that_could_swell_or_forge_what_the_root_shows_is_refused() {
        assert_eq!(report().validate(), Ok(()));
        let mut many = report();
        many.allow = vec!["10.0.0.0/8:1".into(); MAX_REPORTED_RULES + 1];
        assert_eq!(
            many.validate(),
            Err(ReportError::TooManyRules(MAX_REPORTED_RULES + 1))
        );
        let mut long = report();
        long.allow = vec!["a".repeat(MAX_REPORTED_RULE_LEN + 1)];
        assert!(matches!(long.validate(), Err(ReportError::RuleTooLong(_))));
        let mut large = report();
        large.allow = vec!["a".repeat(MAX_REPORTED_RULE_LEN); 40];
        assert!(matches!(large.validate(), Err(ReportError::TooLarge(_))));
        for forged in ["leaf-1\nOnline", "\u{1b}[2J", "", "a b"] {
            let mut bad = report();
            bad.replica = forged.into();
            assert!(bad.validate().is_err(), "{forged:?}");
            let mut bad = report();
            bad.allow = vec![forged.into()];
            assert!(bad.validate().is_err(), "{forged:?}");
            let mut bad = report();
            bad.kubernetes_version = Some(forged.into());
            assert!(bad.validate().is_err(), "{forged:?}");
            let mut bad = report();
            bad.root_keys = vec![forged.into()];
            assert!(bad.validate().is_err(), "{forged:?}");
        }
        let mut many_keys = report();
        many_keys.root_keys = vec!["SHA256:x".into(); crate::identity::keyset::MAX_KEYS + 1];
        assert!(many_keys.validate().is_err());
    }
}
