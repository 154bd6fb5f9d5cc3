use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

/// A client and a server WebSocket over an in-memory pipe, upgraded the way the proxy does.
async fn pair() -> (WebSocket<DuplexStream>, WebSocket<DuplexStream>) {
    let (client_io, mut server_io) = duplex(256 * 1024);
    let server = tokio::spawn(async move {
        let mut head = vec![0u8; 4096];
        let mut len = 0;
        let (key, end) = loop {
            len += server_io.read(&mut head[len..]).await.expect("request");
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(end)) = request.parse(&head[..len]) {
                assert_eq!(request.path, Some(PATH));
                break (
                    upgrade_key(request.headers).expect("upgrade").to_owned(),
                    end,
                );
            }
        };
        server_io
            .write_all(switching_protocols(&key).as_bytes())
            .await
            .expect("answer");
        WebSocket::new(server_io, Role::Server, head[end..len].to_vec())
    });
    let client = connect(client_io, "root.example").await.expect("upgrade");
    (client, server.await.expect("server"))
}

#[test]
fn the_accept_key_is_rfc_6455_s() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn masking_twice_from_any_phase_restores_the_bytes() {
    let original: Vec<u8> = (0..=255u8).cycle().take(1031).collect();
    for offset in 0..4 {
        let mut data = original.clone();
        apply_mask(&mut data, [1, 2, 3, 4], offset);
        assert_ne!(data, original);
        // Unmasking in two pieces keeps the phase.
        let (a, b) = data.split_at_mut(13);
        apply_mask(a, [1, 2, 3, 4], offset);
        apply_mask(b, [1, 2, 3, 4], offset + 13);
        assert_eq!(data, original, "offset {offset}");
    }
}

#[tokio::test]
async fn bytes_cross_both_ways_whole_and_in_order() {
    let (mut client, mut server) = pair().await;
    let sent: Vec<u8> = (0..3 * MAX_FRAME + 17).map(|i| (i * 7) as u8).collect();
    let expected = sent.clone();
    let writer = tokio::spawn(async move {
        client.write_all(&sent).await.expect("write");
        client.flush().await.expect("flush");
        client
    });
    let mut got = vec![0u8; expected.len()];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(got, expected);
    let mut client = writer.await.expect("writer");

    server.write_all(b"and back").await.expect("write");
    server.flush().await.expect("flush");
    let mut back = [0u8; 8];
    client.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"and back");
}

#[tokio::test]
async fn a_shutdown_is_end_of_file_for_the_peer() {
    let (mut client, mut server) = pair().await;
    client.write_all(b"last").await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"last");
}

#[tokio::test]
async fn a_ping_is_answered_with_its_pong() {
    let (client_io, mut raw) = duplex(4096);
    let mut server = WebSocket::new(client_io, Role::Server, Vec::new());
    // A masked ping "hi" (mask 0), then a masked binary frame "x".
    raw.write_all(&[
        0x89, 0x82, 0, 0, 0, 0, b'h', b'i', 0x82, 0x81, 0, 0, 0, 0, b'x',
    ])
    .await
    .expect("write");
    let mut one = [0u8; 1];
    server.read_exact(&mut one).await.expect("read");
    assert_eq!(&one, b"x");
    server.flush().await.expect("flush");
    let mut pong = [0u8; 4];
    raw.read_exact(&mut pong).await.expect("pong");
    assert_eq!(pong, [0x8A, 0x02, b'h', b'i']);
}

#[tokio::test]
async fn frames_split_at_every_byte_are_read_whole() {
    let (io, mut raw) = duplex(64);
    let mut client = WebSocket::new(io, Role::Client, Vec::new());
    // Unmasked binary frame with a 16-bit length: 300 bytes.
    let mut frame = vec![0x82, 126, 0x01, 0x2C];
    frame.extend((0..300).map(|i| i as u8));
    let feeder = tokio::spawn(async move {
        for byte in frame {
            raw.write_all(&[byte]).await.expect("write");
        }
        raw
    });
    let mut got = vec![0u8; 300];
    client.read_exact(&mut got).await.expect("read");
    assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8));
    drop(feeder.await);
}

#[tokio::test]
async fn a_peer_that_breaks_the_rules_is_an_error() {
    for (role, frame, why) in [
        (
            Role::Server,
            vec![0x82, 0x01, b'x'],
            "unmasked from a client",
        ),
        (
            Role::Client,
            vec![0x82, 0x81, 0, 0, 0, 0, b'x'],
            "masked from a server",
        ),
        (Role::Client, vec![0x81, 0x01, b'x'], "text"),
        (Role::Client, vec![0x89, 126, 0, 200], "oversized ping"),
    ] {
        let (io, mut raw) = duplex(64);
        let mut ws = WebSocket::new(io, role, Vec::new());
        raw.write_all(&frame).await.expect("write");
        let mut buf = [0u8; 8];
        let err = ws.read(&mut buf).await.expect_err(why);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{why}");
    }
}

#[tokio::test]
async fn a_refused_upgrade_says_what_the_server_answered() {
    let (io, mut raw) = duplex(4096);
    let answer = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        let _ = raw.read(&mut buf).await;
        raw.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route\n")
            .await
            .expect("answer");
        raw
    });
    let err = connect(io, "lb").await.err().expect("refused");
    assert!(
        err.to_string().contains("HTTP 404 Not Found: no route"),
        "{err}"
    );
    drop(answer.await);
}

#[tokio::test]
async fn a_wrong_accept_key_is_refused() {
    let (io, mut raw) = duplex(4096);
    let answer = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        let _ = raw.read(&mut buf).await;
        raw.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
        )
        .await
        .expect("answer");
        raw
    });
    let err = connect(io, "lb").await.err().expect("refused");
    assert!(err.to_string().contains("does not prove our key"), "{err}");
    drop(answer.await);
}

#[test]
fn only_a_version_13_upgrade_with_a_key_is_taken() {
    let good = [
        httparse::Header {
            name: "Upgrade",
            value: b"WebSocket",
        },
        httparse::Header {
            name: "Connection",
            value: b"keep-alive, Upgrade",
        },
        httparse::Header {
            name: "Sec-WebSocket-Version",
            value: b"13",
        },
        httparse::Header {
            name: "Sec-WebSocket-Key",
            value: b"dGhlIHNhbXBsZSBub25jZQ==",
        },
    ];
    assert_eq!(upgrade_key(&good), Ok("dGhlIHNhbXBsZSBub25jZQ=="));
    let mut old = good;
    old[2].value = b"8";
    assert!(upgrade_key(&old).is_err());
    let mut keyless = good;
    keyless[3].value = b"short";
    assert!(upgrade_key(&keyless).is_err());
    assert!(upgrade_key(&good[1..]).is_err());
}
