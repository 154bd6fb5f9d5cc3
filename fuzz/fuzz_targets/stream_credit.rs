//! Per-stream control frames (credit grants and dial answers) as extended data delivers them.
//!
//! Invariants: a decoded frame re-encodes to a frame that decodes to it; a dial error message
//! never exceeds its limit; a credit frame is exactly five bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::protocol::stream::{MAX_DIAL_ERROR_MESSAGE, StreamControl};

fuzz_target!(|frame: &[u8]| {
    let Ok(decoded) = StreamControl::decode(frame) else {
        return;
    };
    match &decoded {
        StreamControl::Credit(n) => {
            assert_eq!(frame.len(), 5);
            assert_eq!(frame[1..], n.to_be_bytes());
        }
        StreamControl::DialOk => assert_eq!(frame, [2]),
        StreamControl::DialFailed(e) => {
            assert!(e.message.len() <= MAX_DIAL_ERROR_MESSAGE);
            assert_eq!(e.message.as_bytes(), &frame[2..]);
        }
    }
    let encoded = decoded.encode();
    assert_eq!(StreamControl::decode(&encoded).as_ref(), Ok(&decoded));
});
