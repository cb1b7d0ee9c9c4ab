//! Per-client-address and per-user session limits.

use crate::rules::canonical;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// One loop's view of the limits: which address each of its sessions was
/// counted under (by its slab key, which only means something in this
/// loop), over counts that every loop shares. The shared counts are locked
/// only at accept, login and close, and not at all when no limit is set.
pub(crate) struct Limits {
    per_client: u32,
    per_user: u32,
    /// The address each session was counted under, by slab key.
    peer_of: Vec<Option<IpAddr>>,
    counts: Arc<Mutex<Counts>>,
}

/// The counts behind the limits, shared by every worker.
pub(crate) struct Counts {
    /// Sessions allowed per client address (0: no limit, nothing counted).
    per_client: u32,
    clients: HashMap<IpAddr, u32>,
    /// Sessions allowed per user (0: no limit, nothing counted).
    per_user: u32,
    /// Names of users with open sessions to their ids (from 1). A session
    /// keeps counting against the right user across users-file reloads; a
    /// name leaves the table with its last session, so the table holds only
    /// users with sessions open, never every name that ever logged in.
    user_ids: HashMap<Box<[u8]>, u32>,
    /// Open sessions and the name, by user id − 1.
    user_sessions: Vec<(u32, Box<[u8]>)>,
    /// Ids whose user has no session left, to be given out again.
    free_ids: Vec<u32>,
}

impl Counts {
    pub(crate) fn new(per_client: Option<u32>, per_user: Option<u32>) -> Arc<Mutex<Counts>> {
        Arc::new(Mutex::new(Counts {
            per_client: per_client.unwrap_or(0),
            clients: HashMap::new(),
            per_user: per_user.unwrap_or(0),
            user_ids: HashMap::new(),
            user_sessions: Vec::new(),
            free_ids: Vec::new(),
        }))
    }
}

impl Limits {
    /// Limits of one loop alone.
    #[cfg(test)]
    pub(crate) fn new(per_client: Option<u32>, per_user: Option<u32>) -> Limits {
        Limits::over(Counts::new(per_client, per_user))
    }

    /// Limits of one loop over counts shared with others.
    pub(crate) fn over(counts: Arc<Mutex<Counts>>) -> Limits {
        let (per_client, per_user) = {
            let c = lock(&counts);
            (c.per_client, c.per_user)
        };
        Limits { per_client, per_user, peer_of: Vec::new(), counts }
    }

    /// Counts a new session from `ip` in slot `key`; false (and nothing
    /// counted) when `ip` already has its limit.
    pub(crate) fn admit_client(&mut self, key: usize, ip: IpAddr) -> bool {
        if self.per_client == 0 {
            return true;
        }
        let ip = canonical(ip);
        {
            let mut c = lock(&self.counts);
            let n = c.clients.entry(ip).or_insert(0);
            if *n >= self.per_client {
                return false;
            }
            *n += 1;
        }
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
        let mut c = lock(&self.counts);
        let id = match c.user_ids.get(user) {
            Some(&id) => id,
            None => {
                let id = match c.free_ids.pop() {
                    Some(id) => id,
                    None => {
                        c.user_sessions.push((0, Box::default()));
                        c.user_sessions.len() as u32
                    }
                };
                c.user_sessions[id as usize - 1] = (0, Box::from(user));
                c.user_ids.insert(Box::from(user), id);
                id
            }
        };
        let n = &mut c.user_sessions[id as usize - 1].0;
        if *n >= self.per_user {
            // `per_user` is at least 1, so the entry has sessions: it stays.
            return None;
        }
        *n += 1;
        Some(id)
    }

    /// Uncounts the session in slot `key`, logged in as `user` (0: none).
    pub(crate) fn release(&mut self, key: usize, user: u32) {
        let ip = self.peer_of.get_mut(key).and_then(Option::take);
        if ip.is_none() && user == 0 {
            return;
        }
        let mut c = lock(&self.counts);
        if let Some(ip) = ip
            && let Some(n) = c.clients.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                c.clients.remove(&ip);
            }
        }
        if let Some((n, name)) = user.checked_sub(1).and_then(|i| c.user_sessions.get_mut(i as usize))
            && *n > 0
        {
            *n -= 1;
            if *n == 0 {
                let name = std::mem::take(name);
                c.user_ids.remove(&name);
                c.free_ids.push(user);
            }
        }
    }
}

/// A poisoned lock only means another worker panicked mid-update of plain
/// counters; they stay usable.
fn lock(m: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        assert!(!lock(&l.counts).clients.contains_key(&a));
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

    /// The table holds the users with sessions open, not every name that
    /// ever logged in: a thousand users one after another leave it empty,
    /// and their ids are reused.
    #[test]
    fn the_user_table_forgets_users_without_sessions() {
        let mut l = Limits::new(None, Some(2));
        for i in 0..1000 {
            let name = format!("user{i}");
            let id = l.admit_user(name.as_bytes()).unwrap();
            let again = l.admit_user(name.as_bytes()).unwrap();
            assert_eq!(id, again, "one id per user while it has sessions");
            assert_eq!(l.admit_user(name.as_bytes()), None);
            l.release(0, id);
            l.release(0, again);
        }
        let c = lock(&l.counts);
        assert!(c.user_ids.is_empty(), "{} names kept", c.user_ids.len());
        assert_eq!(c.user_sessions.len(), 1, "ids are reused");
        drop(c);
        // Released twice: harmless, and no id is freed twice.
        let id = l.admit_user(b"x").unwrap();
        l.release(0, id);
        l.release(0, id);
        let (a, b) = (l.admit_user(b"a").unwrap(), l.admit_user(b"b").unwrap());
        assert_ne!(a, b);
    }

    /// Two loops over the same counts: a client's sessions count together
    /// wherever they were accepted, and each loop releases its own slots.
    #[test]
    fn shared_between_loops() {
        let counts = Counts::new(Some(2), Some(1));
        let (mut one, mut two) = (Limits::over(Arc::clone(&counts)), Limits::over(counts));
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(one.admit_client(0, a));
        assert!(two.admit_client(0, a), "the same slot key in another loop");
        assert!(!one.admit_client(1, a), "the limit counts both loops");
        assert!(!two.admit_client(1, a));
        two.release(0, 0);
        assert!(one.admit_client(1, a));
        one.release(1, 0);
        one.release(0, 0);
        assert!(lock(&one.counts).clients.is_empty());
        let alice = one.admit_user(b"alice").unwrap();
        assert_eq!(two.admit_user(b"alice"), None);
        one.release(7, alice);
        assert_eq!(two.admit_user(b"alice"), Some(alice));
    }
}
