//! The client address of a request: the peer address, unless the peer is a configured trusted proxy
//! (`network.trusted_proxies`), in which case the nearest untrusted hop of `X-Forwarded-For` (read from the
//! right, so entries a client wrote itself on the left are never believed).
//!
//! A header from any other peer is ignored: a client cannot choose its audited or throttled address.

use ipnet::IpNet;
use std::net::IpAddr;

/// Resolves the client address from the peer and the `X-Forwarded-For` values (in order of appearance).
pub fn resolve<'a>(peer: IpAddr, forwarded: impl Iterator<Item = &'a str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded.flat_map(|v| v.split(',')).map(str::trim).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            // A malformed hop: stop at the last address a trusted proxy vouched for.
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_trusted_peers_are_believed() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let client = "203.0.113.7";
        assert_eq!(resolve(ip("198.51.100.1"), [client].into_iter(), &trusted), ip("198.51.100.1"));
        assert_eq!(resolve(ip("10.0.0.2"), [client].into_iter(), &trusted), ip(client));
        assert_eq!(resolve(ip("10.0.0.2"), ["1.2.3.4, 203.0.113.7, 10.0.0.9"].into_iter(), &trusted), ip(client));
        assert_eq!(resolve(ip("10.0.0.2"), ["1.2.3.4", "203.0.113.7"].into_iter(), &trusted), ip(client));
        assert_eq!(resolve(ip("10.0.0.2"), std::iter::empty(), &trusted), ip("10.0.0.2"));
        assert_eq!(resolve(ip("10.0.0.2"), ["garbage, 10.0.0.9"].into_iter(), &trusted), ip("10.0.0.9"));
        assert_eq!(resolve(ip("10.0.0.2"), [client].into_iter(), &[]), ip("10.0.0.2"));
    }
}
