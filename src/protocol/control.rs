//! The control channel: heartbeats, discovery and drain, one per tunnel.
//!
//! The agent opens an SSH session channel and asks for the [`CONTROL_SUBSYSTEM`]; after that both
//! sides exchange length-prefixed JSON messages (a 4-byte big-endian length, then the JSON).
//! JSON keeps the channel readable in a packet capture and lets either side add fields.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

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
        /// The agent's version, for logs.
        version: String,
        /// Heartbeat interval the agent asks for; the proxy may clamp it.
        heartbeat_interval_ms: u64,
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
    },
    /// Answer to `Ping`.
    Pong { seq: u64 },
    /// The proxies the agent should hold tunnels to (the seed's "discovery request").
    Discovery { proxies: Vec<ProxyInfo> },
    /// The proxy is draining: the agent should open a tunnel elsewhere and then leave.
    Reconnect { reason: String },
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
