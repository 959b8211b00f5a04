//! Tunnel names: validation and readable random names.

use rand::Rng;
use rand::seq::IndexedRandom;

/// Names nobody may claim: they collide with infrastructure hostnames or invite
/// phishing.
pub const RESERVED: &[&str] = &[
    "www",
    "api",
    "admin",
    "control",
    "edge",
    "edges",
    "app",
    "mail",
    "smtp",
    "imap",
    "ftp",
    "ns",
    "ns1",
    "ns2",
    "dns",
    "grpc",
    "status",
    "metrics",
    "login",
    "auth",
    "oauth",
    "sso",
    "account",
    "accounts",
    "billing",
    "support",
    "help",
    "docs",
    "dashboard",
    "internal",
    "localhost",
    "netbore",
    "root",
    "static",
    "cdn",
    "assets",
];

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Not a DNS label.
    Invalid(String),
    /// Reserved.
    Reserved,
}

/// Checks that `name` is a lowercase DNS label and not reserved.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 63 {
        return Err(NameError::Invalid(format!(
            "a name has 1 to 63 characters, '{name}' has {}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::Invalid(format!(
            "'{name}' contains '{c}'; use lowercase letters, digits and hyphens"
        )));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Invalid(format!(
            "'{name}' starts or ends with a hyphen"
        )));
    }
    if name.len() >= 4 && &name[2..4] == "--" {
        return Err(NameError::Invalid(format!(
            "'{name}' has '--' in positions 3-4, which DNS reserves for encoded names"
        )));
    }
    if RESERVED.contains(&name) {
        return Err(NameError::Reserved);
    }
    Ok(())
}

const ADJECTIVES: &[&str] = &[
    "amber", "brave", "calm", "clever", "cosmic", "crisp", "dapper", "eager", "fancy", "gentle",
    "golden", "happy", "jolly", "keen", "lively", "lucky", "mellow", "nimble", "proud", "quick",
    "quiet", "rapid", "shiny", "silver", "smooth", "sunny", "swift", "tidy", "vivid", "witty",
];

const NOUNS: &[&str] = &[
    "badger", "falcon", "otter", "panda", "heron", "lynx", "koala", "raven", "tiger", "walrus",
    "beacon", "canyon", "comet", "delta", "ember", "fjord", "glacier", "harbor", "island",
    "meadow", "nebula", "orchid", "pebble", "prairie", "river", "summit", "tundra", "willow",
];

/// A readable random name such as `swift-otter-4k2p`.
pub fn random() -> String {
    let mut rng = rand::rng();
    let adj = ADJECTIVES.choose(&mut rng).expect("non-empty");
    let noun = NOUNS.choose(&mut rng).expect("non-empty");
    let suffix: String = (0..4)
        .map(|_| {
            let c = rng.random_range(0..36u8);
            (if c < 10 { b'0' + c } else { b'a' + c - 10 }) as char
        })
        .collect();
    format!("{adj}-{noun}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert!(validate("my-app-1").is_ok());
        assert!(matches!(validate(""), Err(NameError::Invalid(_))));
        assert!(matches!(validate("My-App"), Err(NameError::Invalid(_))));
        assert!(matches!(validate("a.b"), Err(NameError::Invalid(_))));
        assert!(matches!(validate("-a"), Err(NameError::Invalid(_))));
        assert!(matches!(validate("xn--abc"), Err(NameError::Invalid(_))));
        assert!(matches!(
            validate(&"a".repeat(64)),
            Err(NameError::Invalid(_))
        ));
        assert_eq!(validate("www"), Err(NameError::Reserved));
    }

    #[test]
    fn random_names_are_valid() {
        for _ in 0..200 {
            let n = random();
            assert!(validate(&n).is_ok(), "{n}");
        }
    }
}
