//! Control's error codes as one type.
//!
//! Every refusal control sends carries a stable snake_case code (`{"error": {"code",
//! "message"}}` over REST, `code: message` in a gRPC status). Servers build them from
//! [`ErrorCode`] and clients match on it, so a code is spelt in one place and a caller
//! never matches by string prefix. A code this build does not know (a newer control)
//! parses as [`ErrorCode::Other`] and is treated as transient unless its HTTP status
//! says otherwise.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! codes {
    ($( $(#[doc = $doc:literal])* $variant:ident = $s:literal, )*) => {
        /// A stable error code (see the module documentation).
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[doc = $doc])* $variant, )*
            /// A code this build does not know, as sent.
            Other(String),
        }

        impl ErrorCode {
            /// Every known code (not [`ErrorCode::Other`]).
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it travels.
            pub fn as_str(&self) -> &str {
                match self {
                    $( ErrorCode::$variant => $s, )*
                    ErrorCode::Other(s) => s,
                }
            }

            /// Parses a code; unknown codes become [`ErrorCode::Other`].
            pub fn parse(s: &str) -> ErrorCode {
                match s {
                    $( $s => ErrorCode::$variant, )*
                    other => ErrorCode::Other(other.to_string()),
                }
            }
        }
    };
}

codes! {
    // Requests.
    /// The request is malformed (bad JSON, an unknown field, a bad parameter).
    InvalidRequest = "invalid_request",
    /// No such endpoint.
    NotFound = "not_found",
    /// The endpoint does not take this method.
    MethodNotAllowed = "method_not_allowed",
    /// The request body is over control's limit.
    BodyTooLarge = "body_too_large",
    // Credentials.
    /// A credential is needed and none was sent.
    Unauthorized = "unauthorized",
    /// The credential does not allow this.
    Forbidden = "forbidden",
    /// The bootstrap credential is wrong.
    BadCredential = "bad_credential",
    /// Control has no bootstrap credential configured.
    BootstrapDisabled = "bootstrap_disabled",
    /// A requested scope does not exist.
    InvalidScope = "invalid_scope",
    /// The token has expired.
    TokenExpired = "token_expired",
    /// The token is not valid yet (clock skew).
    TokenNotYetValid = "token_not_yet_valid",
    /// The token is for another audience.
    TokenWrongAudience = "token_wrong_audience",
    /// The token is from another issuer.
    TokenWrongIssuer = "token_wrong_issuer",
    /// The token is of another type (e.g. a recreate token where a management token is needed).
    TokenWrongType = "token_wrong_type",
    /// The token was signed by a key control does not know.
    TokenUnknownKid = "token_unknown_kid",
    /// The token's signature does not verify.
    TokenBadSignature = "token_bad_signature",
    /// The token is not a well-formed JWT.
    TokenMalformed = "token_malformed",
    /// The API key was revoked.
    ApiKeyRevoked = "api_key_revoked",
    /// The API key has expired.
    ApiKeyExpired = "api_key_expired",
    /// No such API key (or not one the caller may see).
    ApiKeyNotFound = "api_key_not_found",
    /// The owner has as many API keys as allowed.
    TooManyApiKeys = "too_many_api_keys",
    /// The name is outside the credential's name pattern.
    NameNotAllowed = "name_not_allowed",
    /// A name pattern is malformed.
    InvalidNamePattern = "invalid_name_pattern",
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused = "idempotency_key_reused",
    /// A request with this idempotency key is still being processed; retry.
    IdempotencyKeyInUse = "idempotency_key_in_use",
    /// A tunnel credential (`nbt_…`) is malformed or unknown, or its tunnel was deleted.
    CredentialInvalid = "credential_invalid",
    /// The tunnel credential was revoked; an agent stops.
    CredentialRevoked = "credential_revoked",
    /// No such credential on this tunnel.
    CredentialNotFound = "credential_not_found",
    /// The tunnel has as many unrevoked credentials as allowed.
    TooManyCredentials = "too_many_credentials",
    /// Credentials are for named tunnels only.
    TunnelNotNamed = "tunnel_not_named",
    /// The token uses an algorithm that is not allowed.
    TokenAlgorithmNotAllowed = "token_algorithm_not_allowed",
    /// A key could not be used.
    KeyError = "key_error",
    // Names and tunnels.
    /// The name is not a valid DNS label.
    NameInvalid = "name_invalid",
    /// The name is reserved for the service itself.
    NameReserved = "name_reserved",
    /// Another tunnel holds the name.
    NameTaken = "name_taken",
    /// No free random name was found.
    NamesExhausted = "names_exhausted",
    /// No such tunnel (or not one the caller may see).
    TunnelNotFound = "tunnel_not_found",
    /// The tunnel was deleted; its recreate tokens are refused.
    TunnelDeleted = "tunnel_deleted",
    /// The access policy is invalid.
    AccessInvalid = "access_invalid",
    /// The tunnel is disabled by its owner: agents and viewers are refused until it is
    /// enabled (an agent backs off and retries).
    TunnelDisabled = "tunnel_disabled",
    /// An enrolment with this external id is still creating its tunnel; retry shortly.
    EnrollmentInProgress = "enrollment_in_progress",
    /// The tunnel's access policy is set at enrolment; the agent may not send another.
    PolicyFixed = "policy_fixed",
    /// Too many anonymous creations; retry after the `Retry-After`.
    RateLimited = "rate_limited",
    /// The tunnel kind is not `http`, `tcp` or `tls`.
    TunnelKindInvalid = "tunnel_kind_invalid",
    /// Control has no TCP port range (`--tcp-ports`), so it makes no TCP tunnels.
    TcpDisabled = "tcp_disabled",
    /// Every port of control's TCP range is held by a tunnel; retry once one is deleted.
    TcpPortsExhausted = "tcp_ports_exhausted",
    // Edges.
    /// No edge is available to link to.
    NoEdges = "no_edges",
    /// No edge with this id is linked to control.
    EdgeNotFound = "edge_not_found",
    // Control itself.
    /// Control's state store is unreachable; retry shortly.
    StoreUnavailable = "store_unavailable",
    /// Control failed.
    Internal = "internal",
    /// The answer was not control's JSON (a proxy in between?); set by the client.
    HttpError = "http_error",
}

impl ErrorCode {
    /// True when repeating the same request cannot succeed without a change by a
    /// person (another name, another credential, a fixed request): an agent stops
    /// instead of retrying. Unknown codes are not permanent.
    pub fn is_permanent(&self) -> bool {
        use ErrorCode::*;
        match self {
            InvalidRequest
            | NotFound
            | MethodNotAllowed
            | BodyTooLarge
            | Unauthorized
            | Forbidden
            | BadCredential
            | BootstrapDisabled
            | InvalidScope
            | TokenExpired
            | TokenWrongAudience
            | TokenWrongIssuer
            | TokenWrongType
            | TokenUnknownKid
            | TokenBadSignature
            | TokenMalformed
            | TokenAlgorithmNotAllowed
            | NameInvalid
            | NameReserved
            | NameTaken
            | TunnelDeleted
            | AccessInvalid
            | TunnelKindInvalid
            | TcpDisabled
            | ApiKeyRevoked
            | ApiKeyExpired
            | ApiKeyNotFound
            | TooManyApiKeys
            | NameNotAllowed
            | InvalidNamePattern
            | IdempotencyKeyReused
            | CredentialInvalid
            | CredentialRevoked
            | CredentialNotFound
            | TooManyCredentials
            | TunnelNotNamed
            | PolicyFixed => true,
            // A clock can be fixed by waiting; a missing tunnel or edge, a full name
            // space, a busy or failing control can change by themselves.
            TokenNotYetValid | KeyError | NamesExhausted | TunnelNotFound | RateLimited
            | NoEdges | EdgeNotFound | StoreUnavailable | Internal | HttpError
            | IdempotencyKeyInUse | TunnelDisabled | EnrollmentInProgress | TcpPortsExhausted
            | Other(_) => false,
        }
    }

    /// True for codes about a token or credential the caller sent.
    pub fn is_credential(&self) -> bool {
        self.as_str().starts_with("token_")
            || matches!(
                self,
                ErrorCode::Unauthorized
                    | ErrorCode::Forbidden
                    | ErrorCode::BadCredential
                    | ErrorCode::ApiKeyRevoked
                    | ErrorCode::ApiKeyExpired
                    | ErrorCode::CredentialInvalid
                    | ErrorCode::CredentialRevoked
            )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&str> for ErrorCode {
    fn from(s: &str) -> ErrorCode {
        ErrorCode::parse(s)
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ErrorCode, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_is_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let s = c.as_str();
            assert!(seen.insert(s), "{s} listed twice");
            assert!(
                s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{s} is not snake_case"
            );
            assert_eq!(&ErrorCode::parse(s), c);
            let json = serde_json::to_string(c).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(&serde_json::from_str::<ErrorCode>(&json).unwrap(), c);
        }
    }

    #[test]
    fn unknown_codes_survive_and_are_not_permanent() {
        let c = ErrorCode::parse("quota_exceeded");
        assert_eq!(c, ErrorCode::Other("quota_exceeded".into()));
        assert_eq!(c.as_str(), "quota_exceeded");
        assert!(!c.is_permanent());
    }

    #[test]
    fn token_codes_match_the_verifier() {
        use netbore_tokens::TokenError;
        for e in [
            TokenError::Expired,
            TokenError::NotYetValid,
            TokenError::WrongAudience,
            TokenError::WrongIssuer,
            TokenError::UnknownKid("k".into()),
            TokenError::BadSignature,
            TokenError::Malformed("m".into()),
        ] {
            assert!(
                !matches!(ErrorCode::parse(e.code()), ErrorCode::Other(_)),
                "{} is not an ErrorCode",
                e.code()
            );
        }
    }

    #[test]
    fn a_taken_name_is_permanent_and_a_busy_store_is_not() {
        assert!(ErrorCode::NameTaken.is_permanent());
        assert!(ErrorCode::TokenExpired.is_credential());
        assert!(!ErrorCode::StoreUnavailable.is_permanent());
        assert!(!ErrorCode::NoEdges.is_permanent());
    }
}
