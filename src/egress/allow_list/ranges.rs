//! Address classes the allow-list judges before any rule: what a connection to an address
//! really reaches ([`canonical_ip`]), addresses never dialled ([`never_allowed_reason`]) and
//! addresses only an address rule inside their range may permit ([`restricted_range`]).
//!
//! ```text
//!   ::ffff:127.0.0.1 ─┐
//!   ::127.0.0.1 ──────┼─ canonical_ip ─> 127.0.0.1 ─ restricted_range ─> 127.0.0.0/8 loopback
//!   127.0.0.1 ────────┘
//!   64:ff9b::7f00:1 ───── (NAT64, judged by what it carries) ─────────> 64:ff9b::7f00:0/104
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The address a connection to `ip` really reaches, for judging it: IPv4-mapped
/// (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) IPv6 addresses become the IPv4
/// address they carry. `::` and `::1` stay IPv6 (they are the unspecified and loopback
/// addresses, not compatible ones).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let segments = v6.segments();
            if segments[..6] == [0; 6] && v6 > Ipv6Addr::LOCALHOST {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            ip
        }
    }
}

/// Why `ip` may never be dialled whatever the rules say, or `None` if rules decide.
///
/// Unspecified addresses (`0.0.0.0`, `::`, and the rest of `0.0.0.0/8`) reach the local host
/// on Linux or are invalid destinations; broadcast and multicast are not TCP destinations at
/// all. A broad rule such as `0.0.0.0/0:*` must not make them reachable. `ip` is
/// canonicalised ([`canonical_ip`]) first, so mapped forms cannot slip past.
///
/// A NAT64 address (`64:ff9b::a.b.c.d`) carrying such an IPv4 address is refused too: a
/// NAT64 gateway would translate it to the address it carries.
pub fn never_allowed_reason(ip: IpAddr) -> Option<&'static str> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => never_allowed_v4(v4),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("an unspecified address"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("a multicast address"),
        IpAddr::V6(v6) => nat64_embedded(v6).and_then(never_allowed_v4),
    }
}

fn never_allowed_v4(v4: Ipv4Addr) -> Option<&'static str> {
    if v4.octets()[0] == 0 {
        Some("an unspecified address")
    } else if v4.is_broadcast() {
        Some("the broadcast address")
    } else if v4.is_multicast() {
        Some("a multicast address")
    } else {
        None
    }
}

/// A range of addresses that only an address rule inside it may permit (see
/// [`restricted_range`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestrictedRange {
    /// The whole range; a rule permits addresses in it only if the rule's network lies
    /// inside it.
    pub net: IpNet,
    /// What the range is, for messages and logs ("loopback", "link-local").
    pub what: &'static str,
}

/// IPv4 ranges no host rule reaches: the agent's own host and its link (the cloud metadata
/// service lives at `169.254.169.254`).
const RESTRICTED_V4: [(Ipv4Addr, u8, &str); 2] = [
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local"),
];

/// IPv6 ranges no host rule reaches.
const RESTRICTED_V6: [(Ipv6Addr, u8, &str); 2] = [
    (Ipv6Addr::LOCALHOST, 128, "loopback"),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, "link-local"),
];

/// The NAT64 well-known prefix `64:ff9b::/96` (RFC 6052): the last 32 bits are an IPv4
/// address the gateway translates to.
const NAT64_PREFIX: [u16; 6] = [0x64, 0xff9b, 0, 0, 0, 0];

/// The restricted range `ip` lies in, if any: loopback or link-local, judged after
/// [`canonical_ip`], and NAT64 addresses by the IPv4 address they carry (their range is
/// then the NAT64 image of the IPv4 range, e.g. `64:ff9b::7f00:0/104`).
///
/// Restricted addresses are reachable only through an address rule inside the range
/// ([`AllowList::permits_ip`](super::AllowList::permits_ip)), never through a host rule ([`AllowList::permits_resolved`](super::AllowList::permits_resolved)).
pub fn restricted_range(ip: IpAddr) -> Option<RestrictedRange> {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => restricted_v4(v4).map(|(net, what)| RestrictedRange {
            net: IpNet::V4(net),
            what,
        }),
        IpAddr::V6(v6) => {
            if let Some(v4) = nat64_embedded(v6) {
                return restricted_v4(v4).map(|(net, what)| RestrictedRange {
                    net: IpNet::V6(nat64_net(net)),
                    what,
                });
            }
            RESTRICTED_V6.iter().find_map(|&(base, len, what)| {
                let net = Ipv6Net::new_assert(base, len);
                net.contains(&v6).then_some(RestrictedRange {
                    net: IpNet::V6(net),
                    what,
                })
            })
        }
    }
}

fn restricted_v4(v4: Ipv4Addr) -> Option<(Ipv4Net, &'static str)> {
    RESTRICTED_V4.iter().find_map(|&(base, len, what)| {
        let net = Ipv4Net::new_assert(base, len);
        net.contains(&v4).then_some((net, what))
    })
}

/// The IPv4 address a NAT64 (`64:ff9b::/96`) address carries.
fn nat64_embedded(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    (v6.segments()[..6] == NAT64_PREFIX).then(|| {
        let [.., a, b, c, d] = v6.octets();
        Ipv4Addr::new(a, b, c, d)
    })
}

/// The NAT64 image of an IPv4 network: `127.0.0.0/8` becomes `64:ff9b::7f00:0/104`.
fn nat64_net(net: Ipv4Net) -> Ipv6Net {
    let [a, b, c, d] = net.network().octets();
    let [s0, s1, s2, s3, s4, s5] = NAT64_PREFIX;
    let addr = Ipv6Addr::new(
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    );
    Ipv6Net::new_assert(addr, 96 + net.prefix_len())
}

/// Whether a host rule may vouch for `ip`: it is neither never-allowed nor restricted.
pub fn reachable_through_names(ip: IpAddr) -> bool {
    never_allowed_reason(ip).is_none() && restricted_range(ip).is_none()
}
