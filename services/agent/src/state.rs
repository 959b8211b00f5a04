//! The agent's state directory: the recreate token that gets the same name back after
//! a restart. One small JSON file per tunnel identity (the name given with `--name`, or
//! the origin of a quick tunnel), readable only by the user. The identity does not
//! include control's URL, so the same agent pointed at another control replica (or a
//! renamed load balancer) finds its state; files of earlier versions, keyed by control
//! URL too, are read once and written under the new key (the old file is left alone).
//!
//! The agent never deletes this file because a token was refused: only a deleted
//! tunnel ([`StateStore::clear`]) or a newer tunnel (overwritten on success) replaces it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What is remembered between runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    /// The tunnel id.
    pub tunnel_id: String,
    /// The public name.
    pub name: String,
    /// The recreate token (a secret: the file is mode 0600).
    pub recreate_token: String,
    /// The public URL last announced, so a changed name can be told apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
}

/// A state file location.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: Option<PathBuf>,
    /// Where an earlier version kept the same state, read when `path` has none.
    legacy: Option<PathBuf>,
}

/// `key` as a file name: ASCII letters, digits and `-` kept, anything else `_`.
fn file_name(key: &str) -> String {
    let file: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{file}.json")
}

/// The identity a tunnel's state is kept under: `name-NAME` for a name given with
/// `--name`, else `origin-ORIGIN` (a quick tunnel is the same tunnel as long as it
/// serves the same origin).
pub fn tunnel_key(name: Option<&str>, origin: &str) -> String {
    match name {
        Some(n) => format!("name-{n}"),
        None => format!("origin-{origin}"),
    }
}

/// The file in the state directory that keeps this agent's instance id.
pub const INSTANCE_ID_FILE: &str = "instance-id";

/// This agent's instance id: the one kept in `dir` ([`INSTANCE_ID_FILE`]), or a new
/// random one (written there when it can be), so a restarted agent is the same
/// instance and a second machine with its own state is another. Edges report two
/// instances linked with one tunnel credential. Without a directory it is random per
/// process.
pub fn instance_id(dir: Option<&std::path::Path>) -> String {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= netbore_protocol::handshake::MAX_INSTANCE_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if let Some(d) = dir
        && let Ok(s) = std::fs::read_to_string(d.join(INSTANCE_ID_FILE))
        && valid(s.trim())
    {
        return s.trim().to_string();
    }
    let id = format!("ins-{:016x}", rand::random::<u64>());
    if let Some(d) = dir {
        let write = std::fs::create_dir_all(d)
            .and_then(|_| std::fs::write(d.join(INSTANCE_ID_FILE), format!("{id}\n")));
        if let Err(e) = write {
            tracing::debug!(error = %e, "could not keep the instance id; a restart gets a new one");
        }
    }
    id
}

/// The default state directory: `$NETBORE_STATE_DIR`, else `$XDG_STATE_HOME/netbore`,
/// else `~/.local/state/netbore`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NETBORE_STATE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return Some(PathBuf::from(d).join("netbore"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/netbore"))
}

impl StateStore {
    /// The file for `key` under `dir`; `None` keeps nothing.
    pub fn new(dir: Option<PathBuf>, key: &str) -> StateStore {
        StateStore {
            path: dir.map(|d| d.join(file_name(key))),
            legacy: None,
        }
    }

    /// The file of the tunnel named `name` (or, without one, of the quick tunnel for
    /// `origin`) under `dir`, migrating the file an earlier version kept for the same
    /// tunnel at `control_url`.
    pub fn for_tunnel(
        dir: Option<PathBuf>,
        control_url: &str,
        name: Option<&str>,
        origin: &str,
    ) -> StateStore {
        let legacy_key = format!("{control_url}-{}", name.unwrap_or(origin));
        StateStore {
            legacy: dir.as_ref().map(|d| d.join(file_name(&legacy_key))),
            path: dir.map(|d| d.join(file_name(&tunnel_key(name, origin)))),
        }
    }

    /// The file, if any.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// The saved state, if any and readable. State found only at the legacy location
    /// is written to the current one first.
    pub fn load(&self) -> Option<Saved> {
        let read = |p: &PathBuf| -> Option<Saved> {
            let bytes = std::fs::read(p).ok()?;
            serde_json::from_slice(&bytes).ok()
        };
        let path = self.path.as_ref()?;
        if let Some(s) = read(path) {
            return Some(s);
        }
        let old = self.legacy.as_ref().and_then(read)?;
        match self.save(&old) {
            Ok(()) => {
                tracing::info!(from = %self.legacy.as_ref().map(|p| p.display().to_string()).unwrap_or_default(), to = %path.display(), "agent state migrated to its per-tunnel file")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not migrate the agent state; reading the old file")
            }
        }
        Some(old)
    }

    /// Saves state (best effort: a read-only home must not stop the tunnel).
    pub fn save(&self, s: &Saved) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let tmp = path.with_extension("tmp");
        let data = serde_json::to_vec_pretty(s).expect("serializable");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            f.write_all(&data)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Forgets the state: only when control says the tunnel was deleted (a refused token
    /// never clears it).
    pub fn clear(&self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(name: &str) -> Saved {
        Saved {
            tunnel_id: "tun_1".into(),
            name: name.into(),
            recreate_token: "rt".into(),
            public_url: None,
        }
    }

    #[test]
    fn state_is_keyed_by_tunnel_not_by_control() {
        let dir = tempfile::tempdir().unwrap();
        let d = Some(dir.path().to_path_buf());
        let a = StateStore::for_tunnel(d.clone(), "http://a:8080", Some("hub"), "http://o");
        a.save(&saved("hub")).unwrap();
        let b = StateStore::for_tunnel(d.clone(), "http://b:8080", Some("hub"), "http://o");
        assert_eq!(b.load(), Some(saved("hub")));
        // Another name, or a quick tunnel of the same origin, is another tunnel.
        assert!(
            StateStore::for_tunnel(d.clone(), "http://a:8080", Some("x"), "http://o")
                .load()
                .is_none()
        );
        assert!(
            StateStore::for_tunnel(d, "http://a:8080", None, "http://o")
                .load()
                .is_none()
        );
    }

    #[test]
    fn a_file_of_an_earlier_version_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let d = Some(dir.path().to_path_buf());
        // Where earlier versions kept it: keyed by control URL and name.
        StateStore::new(d.clone(), "http://a:8080-hub")
            .save(&saved("hub"))
            .unwrap();
        let s = StateStore::for_tunnel(d.clone(), "http://a:8080", Some("hub"), "http://o");
        assert_eq!(s.load(), Some(saved("hub")));
        assert!(s.path().unwrap().exists(), "written under the new key");
        // From then on it is found whatever the control URL.
        let other = StateStore::for_tunnel(d, "http://b:8080", Some("hub"), "http://o");
        assert_eq!(other.load(), Some(saved("hub")));
    }
}
