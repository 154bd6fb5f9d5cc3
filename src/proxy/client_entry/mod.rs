//! The client entry: HTTP CONNECT and SOCKS5 in front of the tunnels.
