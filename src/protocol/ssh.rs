//! SSH settings both ends share: algorithms and transport sizes.

use std::borrow::Cow;

use russh::keys::ssh_key::Algorithm;
use russh::{Preferred, cipher, compression};

/// Largest SSH packet payload. 32 KiB is what OpenSSH and russh use; larger packets do not
/// speed up AES-GCM measurably and cost more memory per channel.
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;

/// SSH-level channel window. Tether's own per-stream credit does the real flow control
/// (see [`crate::stream`]); this only has to be large enough never to be the bottleneck.
pub const SSH_WINDOW: u32 = 16 * 1024 * 1024;

/// Messages russh queues per channel before its session loop waits. Tether drains every channel
/// at once, so this only absorbs bursts.
pub const CHANNEL_BUFFER: usize = 256;

/// Algorithm preferences: AES-GCM first (hardware-accelerated, about twice as fast as
/// chacha20-poly1305 here), no compression (it costs CPU and leaks lengths), Ed25519 keys and
/// certificates only.
pub fn preferred() -> Preferred {
    Preferred {
        cipher: Cow::Borrowed(&[
            cipher::AES_256_GCM,
            cipher::AES_128_GCM,
            cipher::CHACHA20_POLY1305,
        ]),
        compression: Cow::Borrowed(&[compression::NONE]),
        key: Cow::Borrowed(&[Algorithm::Ed25519]),
        host_key_certificates: Cow::Borrowed(&[Algorithm::Ed25519]),
        ..Preferred::default()
    }
}

/// SSH client settings shared by agents, `tether dial` and peering: Tether's algorithms and
/// sizes, no idle timeout (heartbeats detect dead peers), Nagle off for interactive streams.
pub fn client_config() -> russh::client::Config {
    russh::client::Config {
        preferred: preferred(),
        window_size: SSH_WINDOW,
        maximum_packet_size: MAX_PACKET_SIZE,
        channel_buffer_size: CHANNEL_BUFFER,
        inactivity_timeout: None,
        nodelay: true,
        ..russh::client::Config::default()
    }
}

/// What a client handler does when the session ends: hands the message of a disconnect the
/// proxy sent (a refused certificate says why in it) to `said`, once; an error stays an error.
pub fn keep_disconnect_message(
    reason: russh::client::DisconnectReason<russh::Error>,
    said: &mut Option<tokio::sync::oneshot::Sender<String>>,
) -> Result<(), russh::Error> {
    match reason {
        russh::client::DisconnectReason::ReceivedDisconnect(info) => {
            if let Some(said) = said.take() {
                let _ = said.send(info.message);
            }
            Ok(())
        }
        russh::client::DisconnectReason::Error(e) => Err(e),
    }
}
