//! A forward proxy's answer to the agent's CONNECT (`transport/forward_proxy/answer.rs`), from
//! its first byte.
//!
//! Invariants: the reader never reads past `MAX_HEAD` + 1 bytes; an accepted head is a 2xx whose
//! length is within what was read and the limit, and parsing exactly that head gives the same
//! answer (the bytes after it, the root's, are never part of it); a refusal's status line and
//! any excerpt of its body are printable and short.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tether::transport::forward_proxy::answer::{
    EXCERPT, Head, MAX_HEAD, excerpt, parse_head, read_answer,
};

fuzz_target!(|data: &[u8]| {
    let mut stream = common::duplex(data);
    let answer = common::block_on(read_answer(&mut stream));
    let (unread, _) = stream.into_inner();
    let read = data.len() - unread.len();
    assert!(read <= MAX_HEAD + 1, "read {read} bytes for a head");
    let printable = |s: &str| !s.chars().any(char::is_control);
    if let Ok((head, buf)) = answer {
        assert_eq!(&buf[..], &data[..read], "what was read is what came");
        match head {
            Head::Established { len } => {
                assert!(len <= buf.len() && len <= MAX_HEAD);
                assert_eq!(parse_head(&data[..len]), Ok(Some(Head::Established { len })));
            }
            Head::Refused(refusal) => {
                assert!(!(200..300).contains(&refusal.code));
                assert!(refusal.len <= buf.len() && refusal.len <= MAX_HEAD);
                assert!(printable(&refusal.status), "{:?}", refusal.status);
            }
        }
    }
    let quoted = excerpt(data);
    assert!(printable(&quoted) && quoted.chars().count() <= EXCERPT + 1, "{quoted:?}");
});
