//! Facts about the connection a request came in on, and who the client is.
//! `X-Forwarded-For` is believed only from peers listed in `server.trusted_proxies`.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// Where a request came from; the listener puts it into every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// The client address: the peer, or, when the peer is a trusted proxy, the rightmost
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // A garbled entry ends the trusted chain: what lies left of it is unverifiable.
            Err(_) => break,
        }
    }
    client
}

/// An address as text. IPv4, the usual case, is written digit by digit: `Display` goes through
/// the padding-aware formatter, ~1.5k instructions per address, twice per forwarded request.
pub fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(xff: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_str(xff).unwrap());
        headers
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let outsider: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(client_ip(outsider, &headers("1.2.3.4"), &trusted), outsider);
        assert_eq!(
            client_ip(proxy, &headers("1.2.3.4"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_ip(proxy, &headers("6.6.6.6, 1.2.3.4, 10.9.9.9"), &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap(),
            "a client cannot choose its address by prepending entries"
        );
        assert_eq!(client_ip(proxy, &headers("garbage"), &trusted), proxy);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
        assert_eq!(client_ip(proxy, &headers("1.2.3.4"), &[]), proxy);
    }

    #[test]
    fn ip_text_matches_display() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "255.255.255.255",
            "10.0.100.9",
            "100.20.3.0",
            "199.99.9.109",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
