//! Credentials for RFC 1929 username/password authentication.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// The user table: names to passwords, loaded from a users file.
#[derive(Clone, Default)]
pub struct Users {
    map: HashMap<Box<[u8]>, Box<[u8]>>,
}

/// Never prints a password, nor the names.
impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Users({} entries)", self.map.len())
    }
}

/// Why a users file cannot be used: the file, and the line when one is at
/// fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsersError(pub String);

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsersError {}

/// Longest name or password RFC 1929 can carry.
const MAX_FIELD: usize = 255;

impl Users {
    /// Reads a users file: one `name:password` per line, split at the first
    /// colon (so a password may hold colons and spaces), a trailing `\r`
    /// ignored; blank lines and lines starting with `#` are skipped.
    pub fn load(path: &Path) -> Result<Users, UsersError> {
        let text = std::fs::read(path).map_err(|e| UsersError(format!("{}: {e}", path.display())))?;
        Users::parse(&text).map_err(|(line, why)| UsersError(format!("{}:{line}: {why}", path.display())))
    }

    /// Parses the text of a users file; an error names the line (from 1).
    pub fn parse(text: &[u8]) -> Result<Users, (usize, String)> {
        let mut map = HashMap::new();
        for (i, line) in text.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.trim_ascii().is_empty() || line.first() == Some(&b'#') {
                continue;
            }
            let fail = |why: &str| Err((i + 1, why.to_string()));
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return fail("expected name:password");
            };
            let (name, password) = (&line[..colon], &line[colon + 1..]);
            if name.is_empty() {
                return fail("empty user name");
            }
            if name.len() > MAX_FIELD || password.len() > MAX_FIELD {
                return fail("name and password are limited to 255 bytes (RFC 1929)");
            }
            if map.insert(Box::from(name), Box::from(password)).is_some() {
                return fail(&format!("user {:?} listed twice", name.escape_ascii().to_string()));
            }
        }
        Ok(Users { map })
    }

    /// Builds a table from pairs (for embedders and tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Users {
        let map = pairs.into_iter().map(|(u, p)| (Box::from(u.as_bytes()), Box::from(p.as_bytes()))).collect();
        Users { map }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether `password` is `user`'s. The comparison takes the same time
    /// wherever the first difference is, and whatever the lengths; an
    /// unknown user costs the same comparison.
    pub fn verify(&self, user: &[u8], password: &[u8]) -> bool {
        const NOBODY: &[u8] = &[0; MAX_FIELD];
        match self.map.get(user) {
            Some(want) => ct_eq(want, password),
            None => {
                std::hint::black_box(ct_eq(NOBODY, password));
                false
            }
        }
    }
}

/// Compares all 255 possible bytes, folding differences (and the length
/// difference) into one accumulator without branching on them.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..MAX_FIELD {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// True when a file's permissions let its group or others read it.
pub fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_format() {
        let text = b"# operators\n\nalice:s3cret\r\nbob:pa:ss word \n  \ncarol:\n";
        let users = Users::parse(text).unwrap();
        assert_eq!(users.len(), 3);
        assert!(users.verify(b"alice", b"s3cret"), "trailing CR is not part of the password");
        assert!(users.verify(b"bob", b"pa:ss word "), "split at the first colon; spaces kept");
        assert!(users.verify(b"carol", b""));
        assert!(!users.verify(b"alice", b"s3cret\r"));
        assert!(!users.verify(b"alice", b"s3cre"));
        assert!(!users.verify(b"alice", b"s3cretx"));
        assert!(!users.verify(b"mallory", b"s3cret"));
        assert!(!users.verify(b"", b""));
    }

    #[test]
    fn malformed_lines_are_named() {
        let long = format!("u:{}\n", "p".repeat(256));
        let long_name = format!("{}:p\n", "u".repeat(256));
        let cases: [(&[u8], usize); 5] = [
            (b"alice:x\nno colon here\n", 2),
            (b":nameless\n", 1),
            (long.as_bytes(), 1),
            (long_name.as_bytes(), 1),
            (b"a:1\n#\na:2\n", 3),
        ];
        for (text, line) in cases {
            let err = Users::parse(text).unwrap_err();
            assert_eq!(err.0, line, "{err:?}");
        }
    }

    /// RFC 1929 carries up to 255 bytes each: a name and a password of
    /// exactly 255 bytes load and verify.
    #[test]
    fn names_and_passwords_of_255_bytes_are_accepted() {
        let (name, password) = ("n".repeat(MAX_FIELD), "p".repeat(MAX_FIELD));
        let users = Users::parse(format!("{name}:{password}\n").as_bytes()).unwrap();
        assert!(users.verify(name.as_bytes(), password.as_bytes()));
    }

    #[test]
    fn from_pairs_and_emptiness() {
        let users = Users::from_pairs([("alice", "s3cret"), ("bob", "")]);
        assert_eq!((users.len(), users.is_empty()), (2, false));
        assert!(users.verify(b"alice", b"s3cret"));
        assert!(users.verify(b"bob", b""));
        assert!(!users.verify(b"alice", b""));
        assert!(Users::default().is_empty());
        assert!(Users::parse(b"# nobody yet\n").unwrap().is_empty());
    }

    /// Debug output (which may reach a log) shows how many users there are,
    /// never a name or a password.
    #[test]
    fn debug_shows_the_count_only() {
        let shown = format!("{:?}", Users::from_pairs([("alice", "hunter2")]));
        assert_eq!(shown, "Users(1 entries)");
    }

    /// A users file readable by group or others is reported; owner-only
    /// modes are not.
    #[test]
    fn readable_by_others_table() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("slabsocks-users-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        std::fs::write(&path, "a:b\n").unwrap();
        let table = [(0o600, false), (0o400, false), (0o700, false), (0o640, true), (0o604, true), (0o644, true)];
        for (mode, want) in table {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(readable_by_others(&path), want, "{mode:o}");
        }
        assert!(!readable_by_others(&dir.join("missing")), "no file, nothing to report");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_names_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("slabsocks-users-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        std::fs::write(&path, "ok:1\nbad\n").unwrap();
        let err = Users::load(&path).unwrap_err();
        assert!(err.0.contains("users:2:"), "{err:?}");
        assert_eq!(err.to_string(), err.0, "the operator sees the file and the line");
        assert!(Users::load(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ct_eq_table() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(!ct_eq(b"ab\0", b"ab"), "zero padding must not make lengths equal");
    }
}
