//! The poll token layout: which session, which of its sockets, and which
//! session it was when the socket was registered.
//!
//! ```text
//!  63   62 ........ 32   31 ......... 3   2 .. 0
//! | 0 |  session id   |    slab key     |  role  |      (64-bit targets)
//! ```
//!
//! A session token's top bit is 0, so the reserved tokens at the top of the
//! range (the waker, then the listeners) never collide with one. The id
//! field holds the low bits of the session id; on 64-bit targets that is the
//! whole 31-bit id. On 32-bit targets it holds 8 bits, which is enough for
//! socket events (a closed session's sockets leave the poll set at once, so
//! its stale events live only until the end of the batch already fetched);
//! resolver jobs and deferred turns carry the whole id either way.

use mio::Token;

/// Which of a session's sockets an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The client's TCP connection.
    Client = 0,
    /// The connection to the destination.
    Upstream = 1,
    /// BIND's listening socket.
    BindListener = 2,
    /// UDP ASSOCIATE's socket facing the client.
    Udp = 3,
    /// UDP ASSOCIATE's socket facing the remotes.
    UdpRemote = 4,
    /// A second connect attempt racing the first (Happy Eyeballs).
    Racer = 5,
}

const ROLES: [Role; 6] = [Role::Client, Role::Upstream, Role::BindListener, Role::Udp, Role::UdpRemote, Role::Racer];

const ROLE_BITS: u32 = 3;
/// Slots the slab may use: 2^29 on 64-bit targets, 2^20 on 32-bit ones.
const KEY_BITS: u32 = if usize::BITS >= 64 { 29 } else { 20 };
const ID_BITS: u32 = usize::BITS - 1 - KEY_BITS - ROLE_BITS;
const ROLE_MASK: usize = (1 << ROLE_BITS) - 1;
/// The largest slab key a token can carry.
pub(crate) const MAX_KEY: usize = (1 << KEY_BITS) - 1;
const ID_MASK: usize = (1 << ID_BITS) - 1;

/// Session ids are 31 bits: the id after `ID_MAX` is 0 again.
pub(crate) const ID_MAX: u32 = (1 << 31) - 1;

/// The resolver's wake-ups.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// At most this many listeners (reserved tokens below the waker's).
pub(crate) const MAX_LISTENERS: usize = 64;
const LISTENER_BASE: usize = usize::MAX - 1;
/// The metrics endpoint's listener, and its connections below it.
pub(crate) const METRICS_LISTENER: Token = Token(LISTENER_BASE - MAX_LISTENERS);
/// At most this many metrics connections at once.
pub(crate) const MAX_METRICS: usize = 4;
const METRICS_BASE: usize = LISTENER_BASE - MAX_LISTENERS - 1;

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Waker,
    Listener(usize),
    MetricsListener,
    Metrics(usize),
    /// `id` holds only the bits the token carries: compare with [`same_id`].
    Session {
        key: usize,
        id: u32,
        role: Role,
    },
}

pub(crate) fn session(key: usize, id: u32, role: Role) -> Token {
    debug_assert!(key <= MAX_KEY);
    Token((id as usize & ID_MASK) << (KEY_BITS + ROLE_BITS) | key << ROLE_BITS | role as usize)
}

pub(crate) fn listener(i: usize) -> Token {
    debug_assert!(i < MAX_LISTENERS);
    Token(LISTENER_BASE - i)
}

pub(crate) fn metrics(i: usize) -> Token {
    debug_assert!(i < MAX_METRICS);
    Token(METRICS_BASE - i)
}

pub(crate) fn owner(t: Token) -> Option<Owner> {
    if t == WAKER {
        return Some(Owner::Waker);
    }
    if t == METRICS_LISTENER {
        return Some(Owner::MetricsListener);
    }
    if t.0 >> (usize::BITS - 1) == 1 {
        if let Some(i) = METRICS_BASE.checked_sub(t.0) {
            return (i < MAX_METRICS).then_some(Owner::Metrics(i));
        }
        let i = LISTENER_BASE.checked_sub(t.0)?;
        return (i < MAX_LISTENERS).then_some(Owner::Listener(i));
    }
    let role = *ROLES.get(t.0 & ROLE_MASK)?;
    let key = (t.0 >> ROLE_BITS) & MAX_KEY;
    let id = (t.0 >> (KEY_BITS + ROLE_BITS)) as u32;
    Some(Owner::Session { key, id, role })
}

/// Whether a token's id bits belong to session id `full`.
pub(crate) fn same_id(token_id: u32, full: u32) -> bool {
    token_id as usize & ID_MASK == full as usize & ID_MASK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_and_never_meet_reserved_tokens() {
        for (key, id) in [(0, 0), (1, 7), (MAX_KEY, ID_MAX), (12345, ID_MAX - 1), (MAX_KEY, 0)] {
            for role in ROLES {
                let t = session(key, id, role);
                let Some(Owner::Session { key: k, id: i, role: r }) = owner(t) else { panic!("{t:?}") };
                assert_eq!((k, r), (key, role));
                assert!(same_id(i, id));
                assert_ne!(t, WAKER);
            }
        }
        assert_eq!(owner(WAKER), Some(Owner::Waker));
        assert_eq!(owner(listener(0)), Some(Owner::Listener(0)));
        assert_eq!(owner(listener(MAX_LISTENERS - 1)), Some(Owner::Listener(MAX_LISTENERS - 1)));
        assert_eq!(owner(METRICS_LISTENER), Some(Owner::MetricsListener));
        assert_eq!(owner(metrics(0)), Some(Owner::Metrics(0)));
        assert_eq!(owner(metrics(MAX_METRICS - 1)), Some(Owner::Metrics(MAX_METRICS - 1)));
        assert_eq!(owner(Token(METRICS_BASE - MAX_METRICS)), None);
        for i in 0..MAX_LISTENERS {
            assert_ne!(listener(i), METRICS_LISTENER);
        }
    }

    /// Every field is its own: changing one never yields another's token.
    #[test]
    fn tokens_are_unique_per_key_id_and_role() {
        let mut seen = std::collections::HashSet::new();
        for key in [0, 1, 2, MAX_KEY - 1, MAX_KEY] {
            for id in [0, 1, 2, ID_MASK as u32 - 1, ID_MASK as u32] {
                for role in ROLES {
                    assert!(seen.insert(session(key, id, role)), "{key} {id} {role:?}");
                }
            }
        }
        #[cfg(target_pointer_width = "64")]
        assert!(!same_id(0, 1 << 30), "64-bit tokens carry the whole id");
    }

    /// `session` keeps only the id bits its field holds: whatever id it is
    /// given, even one past [`ID_MAX`], the token stays a session token,
    /// below the reserved range, and the fields fill every bit under the top.
    #[test]
    fn any_id_leaves_the_top_bit_to_the_reserved_tokens() {
        for id in [0, ID_MAX, u32::MAX] {
            let t = session(MAX_KEY, id, Role::UdpRemote);
            assert!(matches!(owner(t), Some(Owner::Session { key: MAX_KEY, role: Role::UdpRemote, .. })), "{id}");
            assert!(same_id(owner_id(t), id), "{id}");
        }
        assert_eq!(session(MAX_KEY, u32::MAX, Role::Client).0, usize::MAX >> 1 & !ROLE_MASK);
    }

    fn owner_id(t: Token) -> u32 {
        match owner(t) {
            Some(Owner::Session { id, .. }) => id,
            other => panic!("{t:?} is {other:?}"),
        }
    }

    /// The capacity the layout promises on 64-bit targets: slab keys up to
    /// 2^29 - 1, and every 31-bit session id carried whole.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_64_bit_token_carries_a_29_bit_key_and_the_whole_31_bit_id() {
        let key = (1 << 29) - 1;
        assert_eq!(MAX_KEY, key);
        for id in [0, 1, 1 << 30, u32::MAX >> 1] {
            let t = session(key, id, Role::UdpRemote);
            assert_eq!(owner(t), Some(Owner::Session { key, id, role: Role::UdpRemote }), "{id}");
        }
        assert_eq!(ID_MAX, u32::MAX >> 1, "the id after ID_MAX wraps to 0 within 31 bits");
    }
}
