use super::*;

/// A version 2 header for a TCP client at `source` (to `10.0.0.1:443`), with `tlv` after the
/// addresses.
fn v2(source: SocketAddr, tlv: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match source.ip() {
        IpAddr::V4(ip) => {
            body.extend(ip.octets());
            body.extend([10, 0, 0, 1]);
            0x11
        }
        IpAddr::V6(ip) => {
            body.extend(ip.octets());
            body.extend(Ipv6Addr::LOCALHOST.octets());
            0x21
        }
    };
    body.extend(source.port().to_be_bytes());
    body.extend(443u16.to_be_bytes());
    body.extend(tlv);
    let mut header = V2_SIGNATURE.to_vec();
    header.extend([0x21, family]);
    header.extend(u16::try_from(body.len()).expect("short").to_be_bytes());
    header.extend(body);
    header
}

/// Reads a header from `bytes`; also returns what follows it (all of `bytes` on an error).
fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
    match from_bytes(bytes) {
        Ok((source, len)) => (Ok(source), bytes[len..].to_vec()),
        Err(e) => (Err(e), bytes.to_vec()),
    }
}

#[test]
fn version_1_gives_the_client_and_leaves_what_follows() {
    let (got, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nSSH-2.0-x\r\n");
    assert_eq!(
        got.expect("v1"),
        Some("203.0.113.7:51000".parse().expect("addr"))
    );
    assert_eq!(rest, b"SSH-2.0-x\r\n");

    let (got, _) = read(b"PROXY TCP6 2001:db8::7 ::1 51000 443\r\n");
    assert_eq!(
        got.expect("v1"),
        Some("[2001:db8::7]:51000".parse().expect("addr"))
    );

    let (got, rest) = read(b"PROXY UNKNOWN\r\n\x16\x03");
    assert_eq!(got.expect("unknown"), None);
    assert_eq!(rest, b"\x16\x03");
}

#[test]
fn version_2_gives_the_client_skips_tlvs_and_leaves_what_follows() {
    let client: SocketAddr = "198.51.100.9:40000".parse().expect("addr");
    // An AWS VPC endpoint TLV (type 0xEA), as an NLB sends it.
    let mut bytes = v2(client, &[0xea, 0x00, 0x05, 0x01, b'v', b'p', b'c', b'e']);
    bytes.extend(b"\x16\x03\x01");
    let (got, rest) = read(&bytes);
    assert_eq!(got.expect("v2"), Some(client));
    assert_eq!(rest, b"\x16\x03\x01");

    let client: SocketAddr = "[2001:db8::9]:40000".parse().expect("addr");
    let (got, rest) = read(&v2(client, &[]));
    assert_eq!(got.expect("v2"), Some(client));
    assert!(rest.is_empty());
}

#[test]
fn a_local_version_2_header_is_the_balancer_speaking_for_itself() {
    let mut bytes = V2_SIGNATURE.to_vec();
    bytes.extend([0x20, 0x00, 0x00, 0x00]);
    bytes.extend(b"SSH-");
    let (got, rest) = read(&bytes);
    assert_eq!(got.expect("local"), None);
    assert_eq!(rest, b"SSH-");
}

#[test]
fn a_connection_without_a_header_is_refused_naming_what_it_sent() {
    let (got, _) = read(b"SSH-2.0-OpenSSH_9.6\r\n");
    let error = got.expect_err("no header").to_string();
    assert!(error.contains("SSH-2.0-Ope"), "{error}");
    // Too short to hold any header: the read ends, it does not hang.
    assert!(matches!(read(b"PROX").0, Err(ProxyHeaderError::Io(_))));
}

#[test]
fn bad_headers_are_refused_without_reading_past_their_bounds() {
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
    let (got, _) = read(long.as_bytes());
    assert!(matches!(got, Err(ProxyHeaderError::V1(_))), "{got:?}");
    // Never asked for more than the line's bound, one byte at a time once it is a v1 line.
    assert_eq!(
        next(&long.as_bytes()[..MAX_V1 - 1]).expect("next"),
        Next::Read(1)
    );
    assert!(next(&long.as_bytes()[..MAX_V1]).is_err());
    let mut v2 = V2_SIGNATURE.to_vec();
    assert_eq!(next(&v2).expect("next"), Next::Read(4));
    v2.extend([0x21, 0x11, 0x00, 0x0c]);
    assert_eq!(next(&v2).expect("next"), Next::Read(12));

    for line in [
        &b"PROXY TCP4 1.2.3.4 10.0.0.1 51000\r\n"[..],
        b"PROXY TCP4 1.2.3.4 10.0.0.1 51000 443 9\r\n",
        b"PROXY TCP4 ::1 10.0.0.1 51000 443\r\n",
        b"PROXY TCP4 1.2.3.4 10.0.0.1 70000 443\r\n",
        b"PROXY UDP4 1.2.3.4 10.0.0.1 51000 443\r\n",
    ] {
        assert!(
            matches!(parse_v1(line), Err(ProxyHeaderError::V1(_))),
            "{line:?}"
        );
    }

    let mut huge = V2_SIGNATURE.to_vec();
    huge.extend([0x21, 0x11, 0xff, 0xff]);
    assert!(matches!(
        read(&huge).0,
        Err(ProxyHeaderError::TooLong(65535))
    ));
    assert!(matches!(
        parse_v2(0x11, 0x11, &[0; 12]),
        Err(ProxyHeaderError::V2(_))
    ));
    assert!(matches!(
        parse_v2(0x21, 0x11, &[0; 11]),
        Err(ProxyHeaderError::V2(_))
    ));
    assert!(matches!(
        parse_v2(0x21, 0x21, &[0; 35]),
        Err(ProxyHeaderError::V2(_))
    ));
}
