//! Managed tunnels for platforms: enrolment by external id, disable and enable.
//!
//! A platform that gives each of its machines a URL enrols the machine
//! (`POST /v1/enroll`) with an API key: the same (owner, external id) always gives the
//! same tunnel, on any replica, however many calls race (one row per pair in
//! `enrollments`, taken with an insert that exactly one caller wins). The tunnel is
//! named (held until deleted) and owned by the key's subject; its credential is in the
//! answer when the call created it or asked for a reissue.
//!
//! Disabling keeps the tunnel and its name but closes its links, refuses its
//! credentials and recreate tokens (`tunnel_disabled`) and tells every edge, through
//! every replica ([`ControlEvent::TunnelDisabled`]), to answer its viewers with 403
//! `tunnel_disabled`; enabling undoes it, and the agent, which kept retrying, links
//! again by itself.

use std::time::Duration;

use axum::http::StatusCode;
use netbore_api::{ControlEvent, ErrorCode};
use netbore_tokens::access::{AccessPolicy, TunnelLimits};
use serde::{Deserialize, Serialize};

use crate::Control;
use crate::accounts::Enrollment;
use crate::api::{EnrollRequest, EnrollResponse, Tunnel};
use crate::ops::{self, ApiError, TunnelAction};
use crate::store::{Claim, HELD_UNTIL_DELETED, TunnelRecord};

/// Longest external id.
pub const MAX_EXTERNAL_ID_LEN: usize = 255;
/// Most labels on one enrolment.
pub const MAX_LABELS: usize = 32;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest grace a reissue may give the previous credentials.
pub const MAX_REISSUE_GRACE_SECS: u64 = 7 * 24 * 3600;
/// How long a repeat waits for the first enrolment of its external id to finish.
pub const ENROLL_WAIT: Duration = Duration::from_secs(10);
/// An enrolment row still empty after this long belongs to a creator that died; the
/// next call takes it over.
pub const ENROLL_STALE_SECS: u64 = 60;
const ENROLL_POLL: Duration = Duration::from_millis(50);

/// The access policy and limits fixed at enrolment (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolledPolicy {
    /// Who may reach the tunnel.
    #[serde(default)]
    pub access: AccessPolicy,
    /// Per-request limits.
    #[serde(default)]
    pub limits: TunnelLimits,
}

fn check_request(req: &EnrollRequest) -> Result<(), ApiError> {
    let ext = &req.external_id;
    if ext.is_empty()
        || ext.len() > MAX_EXTERNAL_ID_LEN
        || !ext.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ApiError::bad_request(format!(
            "external_id must be 1 to {MAX_EXTERNAL_ID_LEN} printable ASCII characters without spaces (your platform's id for the machine, e.g. vm-1234)"
        )));
    }
    if req.labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_LABELS} labels; {} were sent",
            req.labels.len()
        )));
    }
    for (k, v) in &req.labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'/' | b'-')
            });
        if !key_ok {
            return Err(ApiError::bad_request(format!(
                "label key '{}' must be 1 to {MAX_LABEL_KEY} characters of a-z, 0-9, '.', '_', '/' and '-'",
                k.chars().take(MAX_LABEL_KEY).collect::<String>()
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(ApiError::bad_request(format!(
                "the value of label '{k}' is longer than {MAX_LABEL_VALUE} bytes or holds control characters"
            )));
        }
    }
    if req
        .reissue_grace_seconds
        .is_some_and(|g| g > MAX_REISSUE_GRACE_SECS)
    {
        return Err(ApiError::bad_request(format!(
            "reissue_grace_seconds is at most {MAX_REISSUE_GRACE_SECS} (7 days)"
        )));
    }
    if req.reissue_grace_seconds.is_some() && !req.reissue_credential {
        return Err(ApiError::bad_request(
            "reissue_grace_seconds goes with reissue_credential: true",
        ));
    }
    req.access.validate().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::AccessInvalid,
            format!("{e} (see docs/access.md)"),
        )
    })?;
    if req.limits.max_body_bytes == Some(0) {
        return Err(ApiError::bad_request(
            "limits.max_body_bytes must be at least 1; leave it out for the edges' own limit",
        ));
    }
    Ok(())
}

/// Enrols a platform's machine: its tunnel, made on the first call and the same on
/// every later one (see the module docs). Needs a management token or API key with
/// `tunnels:write` (and a name its pattern allows).
pub async fn enroll(
    control: &Control,
    bearer: Option<String>,
    req: EnrollRequest,
) -> Result<EnrollResponse, ApiError> {
    let m = ops::management(control, bearer.clone()).await?;
    let Some(m) = m else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "enrolment needs an API key (or management token) with tunnels:write: send 'Authorization: Bearer nbk_…'",
        ));
    };
    if !m.allows("tunnels:write") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "enrolment needs the tunnels:write scope; use a key that has it",
        ));
    }
    check_request(&req)?;
    match (&req.requested_name, &m.name_pattern) {
        (Some(n), _) => {
            crate::names::validate(n).map_err(|e| ops::name_error(n, e))?;
            ops::authorize_name(&m, n)?;
        }
        (None, Some(p)) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::NameNotAllowed,
                format!(
                    "this key is limited to names matching '{p}', so it cannot make a random name; send requested_name matching '{p}'"
                ),
            ));
        }
        (None, None) => {}
    }
    let owner = m.sub.clone();
    let labels = serde_json::to_string(&req.labels).unwrap_or_else(|_| "{}".into());
    let policy = serde_json::to_string(&EnrolledPolicy {
        access: req.access.clone(),
        limits: req.limits.clone(),
    })
    .unwrap_or_else(|_| "{}".into());
    let store = control.store();
    let deadline = tokio::time::Instant::now() + ENROLL_WAIT;
    let (record, created) = loop {
        let now = netbore_tokens::now_unix();
        let first = match store
            .enroll_begin(&owner, &req.external_id, &labels, &policy, now)
            .await?
        {
            Enrollment::First => true,
            Enrollment::Seen {
                tunnel_id,
                created_at,
            } if !tunnel_id.is_empty() => match store.by_id(&tunnel_id, now).await? {
                Some(r) => break (r, false),
                // Its tunnel was deleted: the next call makes a new one.
                None => {
                    store
                        .enroll_retake(
                            &owner,
                            &req.external_id,
                            (&tunnel_id, created_at),
                            &labels,
                            &policy,
                            now,
                        )
                        .await?
                }
            },
            Enrollment::Seen { created_at, .. } => {
                if now >= created_at.saturating_add(ENROLL_STALE_SECS) {
                    store
                        .enroll_retake(
                            &owner,
                            &req.external_id,
                            ("", created_at),
                            &labels,
                            &policy,
                            now,
                        )
                        .await?
                } else {
                    false
                }
            }
        };
        if first {
            match claim(control, &req, &owner, now).await {
                Ok(r) => {
                    store
                        .enroll_finish(&owner, &req.external_id, &r.tunnel_id)
                        .await?;
                    break (r, true);
                }
                Err(e) => {
                    if let Err(e2) = store.enroll_abandon(&owner, &req.external_id).await {
                        tracing::warn!(error = %e2, "could not free an enrolment after a failed create");
                    }
                    return Err(e);
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError {
                retry_after_secs: Some(1),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::EnrollmentInProgress,
                    "another request is enrolling this external_id right now; retry shortly with the same request",
                )
            });
        }
        tokio::time::sleep(ENROLL_POLL).await;
    };
    if created {
        crate::audit::record(
            control,
            &owner,
            "tunnel.enroll",
            &record.tunnel_id,
            Some((&record.tunnel_id, record.owner.as_deref())),
            None,
            serde_json::json!({"name": record.name, "external_id": req.external_id, "labels": req.labels}),
        )
        .await;
        tracing::info!(tunnel = %record.tunnel_id, name = %record.name, owner = %owner, "tunnel enrolled");
    }
    let issue = created || req.reissue_credential;
    let mut issued = None;
    if issue {
        let previous = if created {
            Vec::new()
        } else {
            store.credentials_of(&record.tunnel_id).await?
        };
        let c = ops::new_credential(control, &record, "enroll".into()).await?;
        // The previous credentials: revoked now, or once the grace has passed.
        let grace = req.reissue_grace_seconds.unwrap_or(0);
        let at = netbore_tokens::now_unix() + grace;
        for p in previous.iter().filter(|p| p.revoked_at.is_none()) {
            ops::revoke_credential_at(control, &record, &p.id, at).await?;
        }
        issued = Some(c);
    }
    let cfg = control.config();
    Ok(EnrollResponse {
        hostname: format!("{}.{}", record.name, cfg.domain),
        public_url: cfg.public_url_template.replace("{name}", &record.name),
        tunnel_id: record.tunnel_id.clone(),
        name: record.name.clone(),
        credential_id: issued.as_ref().map(|c| c.credential.credential_id.clone()),
        tunnel_token: issued.map(|c| c.secret),
        created,
        disabled: record.disabled_at.is_some(),
    })
}

/// Claims the enrolled tunnel's name: the requested one, or a random one; held until
/// the tunnel is deleted.
async fn claim(
    control: &Control,
    req: &EnrollRequest,
    owner: &str,
    now: u64,
) -> Result<TunnelRecord, ApiError> {
    let store = control.store();
    match &req.requested_name {
        Some(name) => match store
            .claim_owned(
                name,
                &ops::new_tunnel_id(),
                Some(owner),
                now,
                HELD_UNTIL_DELETED,
                false,
            )
            .await?
        {
            Claim::Won(r) => Ok(r),
            Claim::Taken(_) => Err(ops::name_taken(name)),
        },
        None => {
            for _ in 0..ops::RANDOM_NAME_ATTEMPTS {
                let n = crate::names::random();
                if let Claim::Won(r) = store
                    .claim_owned(
                        &n,
                        &ops::new_tunnel_id(),
                        Some(owner),
                        now,
                        HELD_UNTIL_DELETED,
                        false,
                    )
                    .await?
                {
                    return Ok(r);
                }
            }
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NamesExhausted,
                "could not find a free random name; retry, or send requested_name",
            ))
        }
    }
}

/// Disables (`disable`) or enables a tunnel (an id `tun_…` or a name). Needs
/// `tunnels:write` on the caller's own tunnel, or `admin`. Doing it twice is harmless
/// (the edges are told again).
pub async fn set_disabled(
    control: &Control,
    bearer: Option<String>,
    tunnel: &str,
    disable: bool,
) -> Result<Tunnel, ApiError> {
    let m = ops::management(control, bearer).await?;
    let Some(m) = m else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "this needs a management token or API key with tunnels:write: send 'Authorization: Bearer <token>'",
        ));
    };
    let now = netbore_tokens::now_unix();
    let found = if tunnel.starts_with("tun_") {
        control.store().by_id(tunnel, now).await?
    } else {
        control.store().by_name(tunnel, now).await?
    };
    let t = found.ok_or_else(ops::tunnel_not_found)?;
    ops::authorize_tunnel(&m, &t, TunnelAction::Write)?;
    let hold = now.saturating_add(control.config().name_hold.as_secs());
    let r = control
        .store()
        .set_disabled(&t.tunnel_id, disable.then_some(now), now, hold)
        .await?
        .ok_or_else(ops::tunnel_not_found)?;
    let event = if disable {
        ControlEvent::TunnelDisabled {
            tunnel_id: r.tunnel_id.clone(),
            name: r.name.clone(),
        }
    } else {
        ControlEvent::TunnelEnabled {
            tunnel_id: r.tunnel_id.clone(),
            name: r.name.clone(),
        }
    };
    control.announce_everywhere(&event).await;
    let action = if disable {
        "tunnel.disable"
    } else {
        "tunnel.enable"
    };
    tracing::info!(tunnel = %r.tunnel_id, name = %r.name, action, "tunnel state changed");
    crate::audit::record(
        control,
        &m.sub,
        action,
        &r.tunnel_id,
        Some((&r.tunnel_id, r.owner.as_deref())),
        None,
        serde_json::json!({"name": r.name}),
    )
    .await;
    Ok(ops::tunnel_view(control, &r))
}

/// The refusal for an agent asking to run a disabled tunnel.
pub fn tunnel_disabled(t: &TunnelRecord) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::TunnelDisabled,
        format!(
            "the tunnel '{}' is disabled by its owner; it runs again once enabled (POST /v1/tunnels/{}/enable), and the agent keeps retrying until then",
            t.name, t.tunnel_id
        ),
    )
}
