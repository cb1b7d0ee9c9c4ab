//! Per-client-address and per-user session limits.

use crate::rules::canonical;
use std::collections::HashMap;
use std::net::IpAddr;

pub(crate) struct Limits {
    /// Sessions allowed per client address (0: no limit, nothing counted).
    per_client: u32,
    clients: HashMap<IpAddr, u32>,
    /// The address each session was counted under, by slab key.
    peer_of: Vec<Option<IpAddr>>,
    /// Sessions allowed per user (0: no limit, nothing counted).
    per_user: u32,
    /// User names to ids (from 1); kept across users-file reloads, so a
    /// session keeps counting against the right user.
    user_ids: HashMap<Box<[u8]>, u32>,
    /// Open sessions by user id − 1.
    user_sessions: Vec<u32>,
}

impl Limits {
    pub(crate) fn new(per_client: Option<u32>, per_user: Option<u32>) -> Limits {
        Limits {
            per_client: per_client.unwrap_or(0),
            clients: HashMap::new(),
            peer_of: Vec::new(),
            per_user: per_user.unwrap_or(0),
            user_ids: HashMap::new(),
            user_sessions: Vec::new(),
        }
    }

    /// Counts a new session from `ip` in slot `key`; false (and nothing
    /// counted) when `ip` already has its limit.
    pub(crate) fn admit_client(&mut self, key: usize, ip: IpAddr) -> bool {
        if self.per_client == 0 {
            return true;
        }
        let ip = canonical(ip);
        let n = self.clients.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return false;
        }
        *n += 1;
        if self.peer_of.len() <= key {
            self.peer_of.resize(key + 1, None);
        }
        self.peer_of[key] = Some(ip);
        true
    }

    /// Counts a login by `user`; returns the id to release it with (0 when
    /// users are not limited), or `None` when the user has its limit.
    pub(crate) fn admit_user(&mut self, user: &[u8]) -> Option<u32> {
        if self.per_user == 0 {
            return Some(0);
        }
        let next = self.user_ids.len() as u32 + 1;
        let id = *self.user_ids.entry(Box::from(user)).or_insert(next);
        if self.user_sessions.len() < id as usize {
            self.user_sessions.resize(id as usize, 0);
        }
        let n = &mut self.user_sessions[id as usize - 1];
        if *n >= self.per_user {
            return None;
        }
        *n += 1;
        Some(id)
    }

    /// Uncounts the session in slot `key`, logged in as `user` (0: none).
    pub(crate) fn release(&mut self, key: usize, user: u32) {
        if let Some(ip) = self.peer_of.get_mut(key).and_then(Option::take)
            && let Some(n) = self.clients.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.clients.remove(&ip);
            }
        }
        if let Some(n) = user.checked_sub(1).and_then(|i| self.user_sessions.get_mut(i as usize)) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client() {
        let mut l = Limits::new(Some(2), None);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::ffff:127.0.0.2".parse().unwrap());
        assert!(l.admit_client(0, a));
        assert!(l.admit_client(1, b), "the mapped form is the same client");
        assert!(!l.admit_client(2, a));
        assert!(l.admit_client(2, "127.0.0.3".parse().unwrap()));
        l.release(0, 0);
        assert!(l.admit_client(0, a));
        l.release(0, 0);
        l.release(1, 0);
        l.release(1, 0); // twice is harmless
        assert!(!l.clients.contains_key(&a));
    }

    #[test]
    fn per_user() {
        let mut l = Limits::new(None, Some(1));
        let alice = l.admit_user(b"alice").unwrap();
        assert!(alice > 0);
        assert_eq!(l.admit_user(b"alice"), None);
        let bob = l.admit_user(b"bob").unwrap();
        assert_ne!(alice, bob);
        l.release(5, alice);
        assert_eq!(l.admit_user(b"alice"), Some(alice));
        let mut off = Limits::new(None, None);
        assert_eq!(off.admit_user(b"alice"), Some(0));
        assert!(off.admit_client(0, "127.0.0.1".parse().unwrap()));
    }
}
