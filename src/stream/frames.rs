//! Control messages over the wire: the I/O around [`crate::protocol::control`]'s codec. The
//! protocol module defines the messages and their length-prefixed framing and does no I/O;
//! this reads and writes them on an SSH channel (the control channel's first exchange) or a
//! byte stream (the join).

use serde::{Deserialize, Serialize};

use crate::protocol::control::{ControlError, FrameReader, MAX_CONTROL_MESSAGE, encode};

/// Why a channel gave no message.
#[derive(Debug, thiserror::Error)]
pub enum ChannelReadError {
    #[error("the channel closed")]
    Closed,
    #[error("the peer refused the channel request")]
    Refused,
    #[error(transparent)]
    Frame(#[from] ControlError),
}

/// Reads the next message from an SSH channel, for the steps (hello, welcome) that wait for
/// one specific message before a channel's main loop takes over its reads.
pub async fn next_channel_message<T>(
    read: &mut russh::ChannelReadHalf,
    frames: &mut FrameReader,
) -> Result<T, ChannelReadError>
where
    T: for<'de> Deserialize<'de>,
{
    loop {
        if let Some(message) = frames.next_message::<T>()? {
            return Ok(message);
        }
        match read.wait().await {
            Some(russh::ChannelMsg::Data { data }) => frames.push(&data)?,
            Some(russh::ChannelMsg::Failure) => return Err(ChannelReadError::Refused),
            Some(russh::ChannelMsg::Eof | russh::ChannelMsg::Close) | None => {
                return Err(ChannelReadError::Closed);
            }
            Some(_) => {}
        }
    }
}

/// Reads one message from a byte stream (the join's request/response exchange), never
/// buffering more than [`MAX_CONTROL_MESSAGE`].
pub async fn read_message<T, R>(reader: &mut R) -> Result<T, ControlError>
where
    T: for<'de> Deserialize<'de>,
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt as _;
    let mut prefix = [0u8; 4];
    reader
        .read_exact(&mut prefix)
        .await
        .map_err(eof_is_closed)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_CONTROL_MESSAGE {
        return Err(ControlError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(eof_is_closed)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Writes one message to a byte stream and flushes it.
pub async fn write_message<T, W>(writer: &mut W, message: &T) -> Result<(), ControlError>
where
    T: Serialize,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    writer.write_all(&encode(message)?).await?;
    writer.flush().await?;
    Ok(())
}

fn eof_is_closed(e: std::io::Error) -> ControlError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ControlError::Closed
    } else {
        ControlError::Io(e)
    }
}

/// Sends one control message on an SSH channel; `E` is the caller's error, which says what a
/// failed encoding or send means to it.
pub async fn send_message<T, S, E>(write: &russh::ChannelWriteHalf<S>, message: &T) -> Result<(), E>
where
    T: Serialize,
    S: From<(russh::ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
    E: From<ControlError> + From<russh::Error>,
{
    let bytes = encode(message)?;
    write.data_bytes(bytes).await?;
    Ok(())
}
