//! Per-stream control frames, carried as SSH extended data beside a stream's bytes.
//!
//! russh grants SSH window as soon as data *arrives*, so SSH flow control does not stop a fast
//! sender from filling a slow reader's queue, and a full queue stalls the whole connection. Tether
//! therefore runs its own credit-based flow control per stream: a side may send only as many bytes
//! as its peer has granted. Grants, and the agent's answer to a dial, travel as extended data with
//! code [`CONTROL_EXT`], so the data itself stays unframed and is never copied to be wrapped.

use bytes::{BufMut, Bytes, BytesMut};

use super::{DialError, DialErrorKind};

/// The SSH extended-data type code used for control frames ("teth").
pub const CONTROL_EXT: u32 = 0x7465_7468;

/// Longest error message an agent sends back for a failed dial; longer ones are cut.
pub const MAX_DIAL_ERROR_MESSAGE: usize = 1024;

const CREDIT: u8 = 1;
const DIAL_OK: u8 = 2;
const DIAL_FAILED: u8 = 3;

/// One control frame of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamControl {
    /// The sender may send this many more bytes.
    Credit(u32),
    /// The agent connected to the target; data may flow.
    DialOk,
    /// The agent could not, or would not, connect; the stream closes next.
    DialFailed(DialError),
}

/// A control frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty control frame")]
    Empty,
    #[error("control frame of type {kind} has length {len}, expected {expected}")]
    Length {
        kind: u8,
        len: usize,
        expected: &'static str,
    },
    #[error("unknown control frame type {0}")]
    UnknownType(u8),
    #[error("dial error message is not UTF-8")]
    NotUtf8,
}

impl StreamControl {
    /// Encodes the frame.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(8);
        match self {
            StreamControl::Credit(n) => {
                out.put_u8(CREDIT);
                out.put_u32(*n);
            }
            StreamControl::DialOk => out.put_u8(DIAL_OK),
            StreamControl::DialFailed(err) => {
                let msg = truncate_utf8(&err.message, MAX_DIAL_ERROR_MESSAGE);
                out.reserve(2 + msg.len());
                out.put_u8(DIAL_FAILED);
                out.put_u8(err.kind.code());
                out.put_slice(msg.as_bytes());
            }
        }
        out.freeze()
    }

    /// Decodes one frame (one extended-data message is exactly one frame).
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let (&kind, rest) = frame.split_first().ok_or(FrameError::Empty)?;
        match kind {
            CREDIT => {
                let bytes: [u8; 4] = rest.try_into().map_err(|_| FrameError::Length {
                    kind,
                    len: frame.len(),
                    expected: "5",
                })?;
                Ok(StreamControl::Credit(u32::from_be_bytes(bytes)))
            }
            DIAL_OK if rest.is_empty() => Ok(StreamControl::DialOk),
            DIAL_OK => Err(FrameError::Length {
                kind,
                len: frame.len(),
                expected: "1",
            }),
            DIAL_FAILED => {
                let (&code, msg) = rest.split_first().ok_or(FrameError::Length {
                    kind,
                    len: frame.len(),
                    expected: "at least 2",
                })?;
                if msg.len() > MAX_DIAL_ERROR_MESSAGE {
                    return Err(FrameError::Length {
                        kind,
                        len: frame.len(),
                        expected: "at most 1026",
                    });
                }
                let msg = std::str::from_utf8(msg).map_err(|_| FrameError::NotUtf8)?;
                Ok(StreamControl::DialFailed(DialError::new(
                    DialErrorKind::from_code(code),
                    msg,
                )))
            }
            other => Err(FrameError::UnknownType(other)),
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            StreamControl::Credit(0),
            StreamControl::Credit(u32::MAX),
            StreamControl::DialOk,
            StreamControl::DialFailed(DialError::new(DialErrorKind::Refused, "db:5432 refused")),
        ] {
            assert_eq!(StreamControl::decode(&f.encode()).unwrap(), f);
        }
    }

    #[test]
    fn malformed_frames_are_named() {
        assert_eq!(StreamControl::decode(&[]), Err(FrameError::Empty));
        assert!(matches!(
            StreamControl::decode(&[1, 0, 0]),
            Err(FrameError::Length { kind: 1, .. })
        ));
        assert_eq!(StreamControl::decode(&[9]), Err(FrameError::UnknownType(9)));
        assert_eq!(
            StreamControl::decode(&[3, 2, 0xff, 0xfe]),
            Err(FrameError::NotUtf8)
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_DIAL_ERROR_MESSAGE);
        let f = StreamControl::DialFailed(DialError::new(DialErrorKind::Other, long));
        let StreamControl::DialFailed(e) = StreamControl::decode(&f.encode()).unwrap() else {
            panic!("wrong frame");
        };
        assert!(e.message.len() <= MAX_DIAL_ERROR_MESSAGE);
    }
}
