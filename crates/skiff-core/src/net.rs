//! Where in-process functions (the `js` and `wasm` tiers) may connect when their `network`
//! is `outbound`: anywhere public, never the gateway itself, and loopback, link-local or
//! private addresses only when the operator allows it (`skiff serve --allow-private-egress`).
//! Process tiers get the same effect from their network namespace.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The egress rules of one server, shared by its in-process tiers.
#[derive(Debug, Default)]
pub struct EgressPolicy {
    /// The gateway's own listen address (set by `skiff serve` once bound).
    gateway: Mutex<Option<SocketAddr>>,
    allow_private: AtomicBool,
}

impl EgressPolicy {
    /// A policy that also allows loopback and private destinations.
    pub fn allowing_private() -> EgressPolicy {
        let p = EgressPolicy::default();
        p.set_allow_private(true);
        p
    }

    pub fn set_gateway(&self, addr: SocketAddr) {
        *self.gateway.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
    }

    /// The gateway's listen address, once set.
    pub fn gateway(&self) -> Option<SocketAddr> {
        *self.gateway.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_allow_private(&self, allow: bool) {
        self.allow_private.store(allow, Ordering::Relaxed);
    }

    pub fn allows_private(&self) -> bool {
        self.allow_private.load(Ordering::Relaxed)
    }

    /// Why `ip:port` may not be reached, if it may not.
    pub fn refuse(&self, ip: IpAddr, port: Option<u16>) -> Option<String> {
        if let Some(g) = self.gateway() {
            let same_host = g.ip().is_unspecified() || g.ip() == canonical(ip);
            if same_host && port.is_none_or(|p| p == g.port()) {
                return Some(format!("{ip} is the Skiff gateway itself"));
            }
        }
        if !self.allows_private() && is_internal(ip) {
            return Some(format!("{ip} is a loopback, link-local or private address"));
        }
        None
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Loopback, link-local, private, CGNAT, unspecified, multicast or broadcast.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_link_local()
                || a.is_private()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s0 = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s0 & 0xfe00) == 0xfc00
                || (s0 & 0xffc0) == 0xfe80
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
            "0.0.0.0",
        ] {
            assert!(is_internal(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "100.128.0.1"] {
            assert!(!is_internal(a.parse().unwrap()), "{a}");
        }
        let p = EgressPolicy::default();
        assert!(p.refuse("10.0.0.1".parse().unwrap(), Some(80)).is_some());
        assert!(p.refuse("1.1.1.1".parse().unwrap(), Some(80)).is_none());
        p.set_allow_private(true);
        assert!(p.refuse("10.0.0.1".parse().unwrap(), Some(80)).is_none());
        p.set_gateway("127.0.0.1:8080".parse().unwrap());
        assert!(p.refuse("127.0.0.1".parse().unwrap(), Some(8080)).is_some());
        assert!(p.refuse("127.0.0.1".parse().unwrap(), Some(8081)).is_none());
    }
}
