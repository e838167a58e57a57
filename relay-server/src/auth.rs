//! Agent tokens: created by `relay-server token create`, stored only as SHA-256
//! hashes in `DATA_DIR/tokens.json`, each granting a set of tunnel-name patterns.
//!
//! The file (not sled) is the store so that `token create` and `token revoke` work
//! while the relay runs: the relay re-reads the file whenever it changes.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use hookrelay_shared::{TunnelName, TunnelPattern};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Random bytes in a token: 160 bits, beyond guessing and above the 128 asked for.
const TOKEN_BYTES: usize = 20;

/// Prefix that makes tokens recognisable to people and to secret scanners.
const TOKEN_PREFIX: &str = "hkr_";

const TOKENS_FILE: &str = "tokens.json";

/// One stored token: never the token itself, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Unique name, e.g. the person or machine it was issued to.
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    /// Tunnel names this token may hold.
    pub tunnels: Vec<TunnelPattern>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

impl TokenRecord {
    /// Whether this token may hold `tunnel`.
    pub fn grants(&self, tunnel: &TunnelName) -> bool {
        self.tunnels.iter().any(|p| p.matches(tunnel))
    }
}

/// The token file and an in-memory copy refreshed when the file changes.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    modified: Option<SystemTime>,
    len: u64,
    records: Vec<TokenRecord>,
}

impl TokenStore {
    /// Opens (and creates, when missing) the data directory's token file.
    ///
    /// # Errors
    /// When the directory cannot be created or the file is not valid.
    pub fn open(data_dir: &Path) -> Result<Self, TokenError> {
        fs::create_dir_all(data_dir).map_err(|source| TokenError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let store = TokenStore {
            path: data_dir.join(TOKENS_FILE),
            cache: Mutex::new(Cache::default()),
        };
        store.records()?;
        Ok(store)
    }

    /// Creates a token named `name` for `tunnels` and returns the token, which is
    /// shown this once and stored only as a hash.
    ///
    /// # Errors
    /// [`TokenError::Exists`] when the name is taken; I/O errors.
    pub fn create(&self, name: &str, tunnels: Vec<TunnelPattern>) -> Result<String, TokenError> {
        if name.trim().is_empty() {
            return Err(TokenError::EmptyName);
        }
        if tunnels.is_empty() {
            return Err(TokenError::NoTunnels);
        }
        let mut records = self.records()?;
        if records.iter().any(|r| r.name == name) {
            return Err(TokenError::Exists(name.to_owned()));
        }
        let mut raw = [0u8; TOKEN_BYTES];
        getrandom::fill(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(raw));
        records.push(TokenRecord {
            name: name.to_owned(),
            sha256: hash(&token),
            tunnels,
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        self.write(&records)?;
        Ok(token)
    }

    /// Removes the token named `name`; returns whether it existed.
    ///
    /// # Errors
    /// I/O errors.
    pub fn revoke(&self, name: &str) -> Result<bool, TokenError> {
        let mut records = self.records()?;
        let before = records.len();
        records.retain(|r| r.name != name);
        if records.len() == before {
            return Ok(false);
        }
        self.write(&records)?;
        Ok(true)
    }

    /// All stored tokens (hashes only).
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn list(&self) -> Result<Vec<TokenRecord>, TokenError> {
        self.records()
    }

    /// The record of `token`, when it is valid. Every stored hash is compared, in
    /// constant time, so timing tells nothing about which byte differed.
    ///
    /// # Errors
    /// When the file cannot be read or parsed.
    pub fn authenticate(&self, token: &str) -> Result<Option<TokenRecord>, TokenError> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for record in self.records()? {
            let mut stored = [0u8; 32];
            if hex::decode_to_slice(&record.sha256, &mut stored).is_err() {
                continue;
            }
            // Compares hashes, not tokens, and in constant time anyway: timing
            // could at most reveal a prefix of a hash, which says nothing of a token.
            if bool::from(stored.ct_eq(&presented)) {
                found = Some(record);
            }
        }
        Ok(found)
    }

    fn records(&self) -> Result<Vec<TokenRecord>, TokenError> {
        let meta = match fs::metadata(&self.path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(self.io(source)),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (modified, len) = meta
            .as_ref()
            .map(|m| (m.modified().ok(), m.len()))
            .unwrap_or((None, 0));
        if meta.is_some() && (cache.modified != modified || cache.len != len || modified.is_none())
        {
            let text = fs::read_to_string(&self.path).map_err(|source| self.io(source))?;
            let file: TokenFile =
                serde_json::from_str(&text).map_err(|source| TokenError::Parse {
                    path: self.path.clone(),
                    source,
                })?;
            *cache = Cache {
                modified,
                len,
                records: file.tokens,
            };
        } else if meta.is_none() {
            *cache = Cache::default();
        }
        Ok(cache.records.clone())
    }

    fn write(&self, records: &[TokenRecord]) -> Result<(), TokenError> {
        let text = serde_json::to_string_pretty(&TokenFile {
            tokens: records.to_vec(),
        })
        .map_err(|source| TokenError::Parse {
            path: self.path.clone(),
            source,
        })?;
        let tmp = self.path.with_extension("json.tmp");
        write_private(&tmp, text.as_bytes()).map_err(|source| self.io(source))?;
        fs::rename(&tmp, &self.path).map_err(|source| self.io(source))?;
        Ok(())
    }

    fn io(&self, source: io::Error) -> TokenError {
        TokenError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<TokenRecord>,
}

/// Lowercase hex SHA-256 of a token. Tokens carry 160 random bits, so a fast
/// hash is enough: there is no dictionary to run.
fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Writes a file readable only by its owner: it holds secrets or their hashes.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Why a token operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("a token named {0:?} already exists (revoke it first)")]
    Exists(String),
    #[error("a token needs a non-empty --name")]
    EmptyName,
    #[error("a token needs at least one tunnel pattern (--tunnels)")]
    NoTunnels,
    #[error("cannot access {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{} is not a valid token file", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no randomness available: {0}")]
    Random(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(p: &str) -> Vec<TunnelPattern> {
        vec![p.parse().expect("pattern")]
    }

    #[test]
    fn tokens_are_stored_hashed_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::open(dir.path()).expect("open");
        let token = store.create("alice", patterns("alice-*")).expect("create");
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 2 * TOKEN_BYTES);
        let file = fs::read_to_string(dir.path().join(TOKENS_FILE)).expect("read");
        assert!(
            !file.contains(&token),
            "the token itself must not be stored"
        );

        let record = store.authenticate(&token).expect("auth").expect("valid");
        assert_eq!(record.name, "alice");
        assert!(record.grants(&"alice-dev".parse().expect("name")));
        assert!(!record.grants(&"bob".parse().expect("name")));
        assert!(store.authenticate("hkr_wrong").expect("auth").is_none());
        assert!(matches!(
            store.create("alice", patterns("*")),
            Err(TokenError::Exists(_))
        ));

        // A second store over the same directory (another process) sees changes.
        let other = TokenStore::open(dir.path()).expect("open");
        assert!(other.revoke("alice").expect("revoke"));
        assert!(store.authenticate(&token).expect("auth").is_none());
        assert!(!other.revoke("alice").expect("revoke"));
    }

    #[test]
    fn corrupt_token_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(TOKENS_FILE), "{not json").expect("write");
        let err = TokenStore::open(dir.path()).expect_err("corrupt file");
        assert!(err.to_string().contains("tokens.json"), "{err}");
    }
}
