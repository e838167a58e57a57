//! Which agent holds which tunnel.
//!
//! Behind the [`Routes`] trait so that a multi-node relay can keep the table in
//! NATS later; [`LocalRoutes`] is the single-node, in-memory table. Tunnels that
//! were ever claimed are remembered with their delivery settings (in
//! `DATA_DIR/tunnels.json`), so that while a tunnel's agent is offline a sender
//! is queued for it (202) or told "offline, retry" (503), never "no such
//! tunnel" (404), even across relay restarts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::PathBuf,
    sync::{Mutex, RwLock},
};

use hookrelay_shared::{TunnelName, TunnelSettings};

/// The connection that serves a tunnel.
#[derive(Clone, Debug)]
pub struct AgentLink {
    /// Unique per QUIC connection accepted by this relay.
    pub session_id: u64,
    /// The agent installation's stable id (from its hello).
    pub agent_id: String,
    /// The QUIC connection to open delivery streams on.
    pub connection: quinn::Connection,
}

impl AgentLink {
    fn is_alive(&self) -> bool {
        self.connection.close_reason().is_none()
    }
}

/// Routing table operations the relay needs.
pub trait Routes: Send + Sync + 'static {
    /// Gives all of `tunnels` to `link`, or none of them. A tunnel held by a live
    /// connection of *another* agent is refused; one held by the same agent (a
    /// reconnect racing its own stale connection) is taken over, and the
    /// replaced links are returned so the caller can close them. The tunnels'
    /// delivery `settings` are remembered for while the agent is away.
    ///
    /// # Errors
    /// [`ClaimError::Taken`] naming the first tunnel held by someone else.
    fn claim(
        &self,
        tunnels: &[TunnelName],
        link: AgentLink,
        settings: TunnelSettings,
    ) -> Result<Vec<AgentLink>, ClaimError>;

    /// Frees the tunnels still held by session `session_id`.
    fn release(&self, tunnels: &[TunnelName], session_id: u64);

    /// Where to deliver for `tunnel`, if an agent holds it.
    fn lookup(&self, tunnel: &TunnelName) -> Option<AgentLink>;

    /// The settings of a tunnel that was ever claimed (it exists, even if
    /// offline now); `None` for a tunnel nobody ever held.
    fn settings(&self, tunnel: &TunnelName) -> Option<TunnelSettings>;

    /// Whether `tunnel` was ever claimed.
    fn is_known(&self, tunnel: &TunnelName) -> bool {
        self.settings(tunnel).is_some()
    }

    /// Number of tunnels held right now.
    fn online(&self) -> usize;
}

/// A tunnel could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("tunnel {0} is held by another agent")]
    Taken(TunnelName),
}

/// In-memory routing table for a single relay node.
#[derive(Debug)]
pub struct LocalRoutes {
    held: RwLock<HashMap<TunnelName, AgentLink>>,
    known: Mutex<BTreeMap<TunnelName, TunnelSettings>>,
    known_file: Option<PathBuf>,
}

impl LocalRoutes {
    /// A table that remembers known tunnels in `known_file` (read now, when it
    /// exists; unreadable content is ignored with a warning: it only refines
    /// what happens until each agent reconnects). The list format of earlier
    /// versions is read as tunnels with default settings.
    pub fn open(known_file: Option<PathBuf>) -> Self {
        let known = known_file
            .as_ref()
            .and_then(|p| match fs::read_to_string(p) {
                Ok(text) => match serde_json::from_str::<KnownFile>(&text) {
                    Ok(KnownFile::Settings(map)) => Some(map),
                    Ok(KnownFile::Names(set)) => Some(
                        set.into_iter()
                            .map(|name| (name, TunnelSettings::default()))
                            .collect(),
                    ),
                    Err(err) => {
                        tracing::warn!(path = %p.display(), error = &err as &dyn std::error::Error, "ignoring unreadable tunnel list");
                        None
                    }
                },
                Err(_) => None,
            })
            .unwrap_or_default();
        LocalRoutes {
            held: RwLock::new(HashMap::new()),
            known: Mutex::new(known),
            known_file,
        }
    }

    fn remember(&self, tunnels: &[TunnelName], settings: TunnelSettings) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for name in tunnels {
            changed |= known.insert(name.clone(), settings) != Some(settings);
        }
        if !changed {
            return;
        }
        if let Some(path) = &self.known_file {
            let written = serde_json::to_vec(&*known)
                .map_err(std::io::Error::other)
                .and_then(|bytes| {
                    let tmp = path.with_extension("json.tmp");
                    fs::write(&tmp, bytes)?;
                    fs::rename(&tmp, path)
                });
            if let Err(err) = written {
                tracing::error!(path = %path.display(), error = &err as &dyn std::error::Error, "cannot save tunnel list");
            }
        }
    }
}

/// `tunnels.json`: a map of names to settings, or a plain list (older relays).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum KnownFile {
    Settings(BTreeMap<TunnelName, TunnelSettings>),
    Names(BTreeSet<TunnelName>),
}

impl Routes for LocalRoutes {
    fn claim(
        &self,
        tunnels: &[TunnelName],
        link: AgentLink,
        settings: TunnelSettings,
    ) -> Result<Vec<AgentLink>, ClaimError> {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        for name in tunnels {
            if let Some(current) = held.get(name) {
                if current.agent_id != link.agent_id && current.is_alive() {
                    return Err(ClaimError::Taken(name.clone()));
                }
            }
        }
        let mut replaced: Vec<AgentLink> = Vec::new();
        for name in tunnels {
            if let Some(old) = held.insert(name.clone(), link.clone()) {
                if old.session_id != link.session_id
                    && !replaced.iter().any(|r| r.session_id == old.session_id)
                {
                    replaced.push(old);
                }
            }
        }
        drop(held);
        self.remember(tunnels, settings);
        Ok(replaced)
    }

    fn release(&self, tunnels: &[TunnelName], session_id: u64) {
        let mut held = self.held.write().unwrap_or_else(|p| p.into_inner());
        for name in tunnels {
            if held.get(name).is_some_and(|l| l.session_id == session_id) {
                held.remove(name);
            }
        }
    }

    fn lookup(&self, tunnel: &TunnelName) -> Option<AgentLink> {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner());
        held.get(tunnel).filter(|l| l.is_alive()).cloned()
    }

    fn settings(&self, tunnel: &TunnelName) -> Option<TunnelSettings> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.get(tunnel).copied()
    }

    fn online(&self) -> usize {
        self.held.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
