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

/// Default of `--max-name-labels`: one label, which a `*.<domain>` certificate covers.
pub const DEFAULT_MAX_LABELS: u64 = 1;

/// Most labels `--max-name-labels` may allow: enough for `PORT.pod.team` layouts, few
/// enough that a name stays well under DNS's 253-character limit (4 × 63 + 3 dots).
pub const MAX_LABELS: usize = 4;

/// Checks a name of up to `max_labels` dot-separated labels: each a lowercase DNS label,
/// none reserved (so `www.x` and `x.api` are refused like `www`).
pub fn validate_labels(name: &str, max_labels: usize) -> Result<(), NameError> {
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() > max_labels.max(1) {
        return Err(NameError::Invalid(if max_labels <= 1 {
            format!(
                "'{name}' contains '.'; a name is one DNS label here (this control runs with --max-name-labels 1)"
            )
        } else {
            format!(
                "'{name}' has {} labels; this control allows at most {max_labels} (--max-name-labels)",
                labels.len()
            )
        }));
    }
    if labels.len() > 1 && labels.iter().any(|l| l.is_empty()) {
        return Err(NameError::Invalid(format!(
            "'{name}' has an empty label (a leading, trailing or doubled '.')"
        )));
    }
    labels.iter().try_for_each(|l| validate(l))
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
    fn names_of_several_labels_need_the_setting() {
        let one = validate_labels("localhost-8726.pod-myslug", 1).unwrap_err();
        assert!(matches!(&one, NameError::Invalid(m) if m.contains("--max-name-labels")));
        assert!(validate_labels("localhost-8726.pod-myslug", 2).is_ok());
        assert!(validate_labels("my-app", 1).is_ok());
        assert!(
            matches!(validate_labels("a.b.c", 2), Err(NameError::Invalid(m)) if m.contains("3 labels"))
        );
        assert!(matches!(
            validate_labels("a..b", 3),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            validate_labels(".a", 2),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            validate_labels("a.", 2),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            validate_labels("A.b", 2),
            Err(NameError::Invalid(_))
        ));
        assert_eq!(validate_labels("www.x", 2), Err(NameError::Reserved));
        assert_eq!(validate_labels("x.api", 2), Err(NameError::Reserved));
    }

    #[test]
    fn random_names_are_valid() {
        for _ in 0..200 {
            let n = random();
            assert!(validate(&n).is_ok(), "{n}");
        }
    }
}
