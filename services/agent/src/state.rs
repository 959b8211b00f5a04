//! The agent's state directory: the recreate token that gets the same name back after
//! a restart. One small JSON file per (control, tunnel key), readable only by the user.

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
}

/// A state file location.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: Option<PathBuf>,
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
        StateStore {
            path: dir.map(|d| d.join(format!("{file}.json"))),
        }
    }

    /// The saved state, if any and readable.
    pub fn load(&self) -> Option<Saved> {
        let bytes = std::fs::read(self.path.as_ref()?).ok()?;
        serde_json::from_slice(&bytes).ok()
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

    /// Forgets the state (the token was refused).
    pub fn clear(&self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}
