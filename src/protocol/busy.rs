//! The proxy's "busy, retry soon" answer at the door.
//!
//! A proxy refuses new connections while too many SSH handshakes are in flight (OpenSSH's
//! `MaxStartups`; see `proxy::limits`). It used to close such a connection without a word, so
//! the agent could not tell it from a dead proxy: every refusal doubled the agent's backoff.
//! After a restart of a proxy holding thousands of tunnels, the fleet met the limit at once, and
//! the refused agents drifted to the backoff cap (30 s) before trying again: the storm was
//! spread by the backoff rather than by the proxy's capacity (BENCHMARKS.md, "Fleet").
//!
//! Now the proxy writes one line before closing, which SSH allows before the version string
//! (RFC 4253, section 4.2): `tether-busy retry-ms=N`. An agent that reads it retries after a
//! jittered pause around N instead of counting a failure. Any other SSH client sees a line it
//! skips and then the end of the connection, as before.

use std::time::Duration;

/// How the busy line starts.
pub const BUSY_PREFIX: &[u8] = b"tether-busy retry-ms=";

/// Longest hint an agent accepts: a proxy cannot park its fleet for longer than this.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(30);

/// The line a busy proxy writes before closing: retry in about `retry`.
pub fn busy_line(retry: Duration) -> Vec<u8> {
    let mut line = BUSY_PREFIX.to_vec();
    line.extend_from_slice(format!("{}\r\n", retry.as_millis()).as_bytes());
    line
}

/// The retry hint of a busy line at the start of `first` (the first bytes the proxy sent), or
/// `None` when they are anything else (an SSH version string). A malformed number counts as a
/// busy line with the longest hint: the proxy said it is busy, the number is only advice.
pub fn parse_busy(first: &[u8]) -> Option<Duration> {
    let rest = first.strip_prefix(BUSY_PREFIX)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let hint = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(MAX_RETRY_HINT, Duration::from_millis);
    Some(hint.min(MAX_RETRY_HINT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_line_round_trips_and_an_ssh_banner_is_not_busy() {
        let line = busy_line(Duration::from_millis(1500));
        assert_eq!(line, b"tether-busy retry-ms=1500\r\n");
        assert_eq!(parse_busy(&line), Some(Duration::from_millis(1500)));
        assert_eq!(parse_busy(b"SSH-2.0-russh_0.65\r\n"), None);
        assert_eq!(parse_busy(b""), None);
        assert_eq!(
            parse_busy(b"tether-busy"),
            None,
            "a cut-off prefix is not a hint"
        );
        assert_eq!(
            parse_busy(b"tether-busy retry-ms=x\r\n"),
            Some(MAX_RETRY_HINT)
        );
        assert_eq!(
            parse_busy(b"tether-busy retry-ms=99999999999999999999999\r\n"),
            Some(MAX_RETRY_HINT)
        );
    }
}
