//! The control channel's framing (4-byte length + JSON) and its two message types.
//!
//! Invariants: the chunked reader and the stream reader agree on the first message; however the
//! bytes are chunked, the same messages come out; every decoded message re-encodes and decodes
//! to itself; nothing larger than the limit is ever buffered as a message.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use tether::protocol::control::{
    AgentMessage, ControlError, FrameReader, MAX_CONTROL_MESSAGE, ProxyMessage, encode,
};
use tether::stream::frames::read_message;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, wire)) = data.split_first() else {
        return;
    };
    // The low bits pick a chunk size (1..=64): the SSH channel delivers arbitrary chunks.
    let chunk = usize::from(selector & 0x3f) + 1;
    if selector & 0x40 == 0 {
        check::<AgentMessage>(wire, chunk);
    } else {
        check::<ProxyMessage>(wire, chunk);
    }
});

fn check<T>(wire: &[u8], chunk: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let whole = frames::<T>(wire, wire.len().max(1));
    let chunked = frames::<T>(wire, chunk);
    assert_eq!(whole.0, chunked.0, "chunking changed the messages");
    assert_eq!(whole.1, chunked.1, "chunking changed how the stream ends");

    let streamed = common::block_on(read_message::<T, _>(&mut &wire[..]));
    match (whole.0.first(), &streamed) {
        (Some(first), Ok(message)) => assert_eq!(first, message),
        (Some(_), Err(e)) => panic!("read_message refused what FrameReader accepted: {e}"),
        (None, Ok(m)) => panic!("read_message accepted what FrameReader did not: {m:?}"),
        (None, Err(_)) => {}
    }

    for message in &whole.0 {
        let encoded = encode(message).expect("a decoded message re-encodes");
        assert!(encoded.len() <= 4 + MAX_CONTROL_MESSAGE + 64);
        let mut reader = FrameReader::default();
        reader.push(&encoded).expect("a re-encoded message fits");
        let again = reader.next_message::<T>().expect("re-decodes");
        assert_eq!(
            again.as_ref(),
            Some(message),
            "re-encoding changed the message"
        );
    }
}

/// The messages `FrameReader` yields when fed `chunk` bytes at a time, and how it stopped.
fn frames<T: DeserializeOwned>(wire: &[u8], chunk: usize) -> (Vec<T>, &'static str) {
    let mut reader = FrameReader::default();
    let mut out = Vec::new();
    for piece in wire.chunks(chunk) {
        if let Err(e) = reader.push(piece) {
            return (out, kind(&e));
        }
        loop {
            match reader.next_message::<T>() {
                Ok(Some(m)) => out.push(m),
                Ok(None) => break,
                Err(e) => return (out, kind(&e)),
            }
        }
    }
    (out, "end")
}

fn kind(e: &ControlError) -> &'static str {
    match e {
        ControlError::TooLarge { .. } => "too large",
        ControlError::Malformed(_) => "malformed",
        ControlError::Io(_) => "io",
        ControlError::Closed => "closed",
    }
}
